"""Two CPU processes (gloo): baseline, LGD and FGFI wrapped in DDP the way the trainer does (with
the re-wrap at the backbone-freeze boundary), several iterations across every schedule phase, no
unused-parameter error or deadlock, equal gradients. LGD also with a process whose whole batch has
no object (no context box: the self-teacher's object path has nothing to encode there). UDFA
(self-only, auxiliary BatchNorm): the attack's input gradient inside DDP's forward."""
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PHASES = {  # 6 iterations: LGD distill off 0-1, on 2-4, off 5; backbone frozen 0-2; FGFI warm-up 0-1
    "MODEL.LGD.PRE_NONDISTILL_ITERS": 2, "MODEL.LGD.POST_NONDISTILL_ITERS": 1,
    "MODEL.LGD.PRE_FREEZE_STUDENT_BACKBONE_ITERS": 3, "MODEL.FGFI.WARMUP_ITERS": 2,
    "SOLVER.MAX_ITER": 6,
}


def _worker(rank, world_size, port, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a collective that waits for a gradient that never comes fails after 90 s instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=90))
    torch.set_num_threads(1)
    import lgd_detectron2  # noqa: F401
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from common import load_cfg, tiny_batch
    from lgd_detectron2.engine.trainer import DistillTrainLoop, build_optimizer, wrap_ddp

    configs = {
        "baseline": "configs/Demo/faster_rcnn_R_18_FPN_baseline.yaml",
        "lgd": "configs/Demo/faster_rcnn_R_18_FPN_lgd.yaml",
        "lgd_rank1_without_objects": "configs/Demo/faster_rcnn_R_18_FPN_lgd.yaml",
        "fgfi": "configs/Demo/faster_rcnn_R_18_FPN_fgfi.yaml",
        # input gradients inside DDP's forward, two passes, auxiliary BatchNorm
        "udfa_self_aux_bn": "configs/Demo/faster_rcnn_R_18_FPN_udfa_self.yaml",
    }
    report = {}
    for method, path in configs.items():
        opts = ["MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
                "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.FGFI.TEACHER.ALLOW_RANDOM_INIT", True,
                "MODEL.WEIGHTS", "", "MODEL.UDFA.AUX_BN", True]
        for k, v in PHASES.items():
            opts += [k, v]
        cfg = load_cfg(path, *opts)
        torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts them)
        model = build_model(cfg)
        optimizer = build_optimizer(cfg, model)
        ddp = wrap_ddp(model, cfg)
        empty = (0, 1) if method == "lgd_rank1_without_objects" and rank == 1 else ()
        batch = tiny_batch(seed=10 + rank, empty=empty)  # each rank its own data
        loop = DistillTrainLoop(ddp, [batch] * 6, optimizer, rewrap=lambda m: wrap_ddp(m, cfg))
        equal = []
        for it in range(6):
            with EventStorage(it) as storage:
                loop.iter, loop.storage = it, storage
                loop.run_step()
            grads = torch.cat([
                (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                for p in model.parameters()
            ])
            gathered = [torch.zeros_like(grads) for _ in range(world_size)]
            dist.all_gather(gathered, grads)
            equal.append(bool(torch.equal(gathered[0], gathered[1])) and grads.abs().sum().item() > 0)
        report[method] = equal
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


def test_ddp_two_cpu_processes_all_phases(tmp_path):
    out_file = str(tmp_path / "report.json")
    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(2, port, out_file), nprocs=2, join=True)
    with open(out_file) as f:
        report = json.load(f)
    assert set(report) == {"baseline", "lgd", "lgd_rank1_without_objects", "fgfi", "udfa_self_aux_bn"}
    for method, equal in report.items():
        assert equal == [True] * 6, (method, equal)
