"""Exact --resume across schedule phases, the non-finite-loss stop, safe checkpoint loading."""
import os

import pytest
import torch

from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng

from common import load_cfg
from lgd_detectron2.engine import NonFiniteLossError, Trainer
from lgd_detectron2.export import export_student


def small_cfg(method, out_dir, *opts):
    path = {"baseline": "configs/Demo/faster_rcnn_R_18_FPN_baseline.yaml",
            "lgd": "configs/Demo/faster_rcnn_R_18_FPN_lgd.yaml"}[method]
    cfg = load_cfg(
        path, "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "SOLVER.IMS_PER_BATCH", 2, "DATALOADER.NUM_WORKERS", 0,
        "SOLVER.MAX_ITER", 8, "SOLVER.CHECKPOINT_PERIOD", 4, "SOLVER.WARMUP_ITERS", 2,
        "SOLVER.STEPS", (5,), "INPUT.MIN_SIZE_TRAIN", (128,), "INPUT.MAX_SIZE_TRAIN", 128,
        "DATASETS.TEST", (), "SEED", 3, "OUTPUT_DIR", str(out_dir),
        # the schedule crosses the interruption at iteration 4
        "MODEL.LGD.PRE_NONDISTILL_ITERS", 3, "MODEL.LGD.PRE_FREEZE_STUDENT_BACKBONE_ITERS", 5,
        "MODEL.LGD.POST_NONDISTILL_ITERS", 2, *opts,
    )
    cfg.freeze()
    return cfg


class StopAt(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            raise KeyboardInterrupt("simulated interruption")


def losses_by_iter(trainer):
    hist = trainer.storage.histories()
    names = [k for k in hist if k.startswith("loss") or k == "total_loss"]
    return {(k, it): v for k in names for v, it in hist[k].values()}


def train(cfg, resume=False, hooks=()):
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    trainer.register_hooks(list(hooks))
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


@pytest.mark.parametrize("method", ["lgd", "baseline"])
def test_resume_matches_uninterrupted_run(tmp_path, method):
    full = train(small_cfg(method, tmp_path / "full"))
    reference = losses_by_iter(full)
    ref_lr = full.storage.history("lr").values()

    cfg = small_cfg(method, tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, hooks=[StopAt(6)])  # checkpoint of iteration 3 exists, 4 and 5 are lost
    assert os.path.isfile(tmp_path / "interrupted" / "model_0000003.pth")
    with open(tmp_path / "interrupted" / "last_checkpoint") as f:
        assert f.read().strip() == "model_0000003.pth"
    resumed = train(cfg, resume=True)
    assert resumed.start_iter == 4
    got = losses_by_iter(resumed)
    compared = [(k, it) for (k, it) in got if it >= 4]
    assert len(compared) >= 4 * 5
    for key in compared:
        assert got[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-5), key
    lr = dict((it, v) for v, it in resumed.storage.history("lr").values())
    for v, it in ref_lr:
        if it >= 4:
            assert lr[it] == pytest.approx(v), it
    if method == "lgd":
        assert ("loss_distill", 7) in got and ("loss_cls_tea", 4) in got


class PoisonAt(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            model = getattr(self.trainer.model, "module", self.trainer.model)
            with torch.no_grad():
                model.roi_heads.box_predictor.cls_score.weight.fill_(float("nan"))


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
    cfg = small_cfg("lgd", tmp_path / "nan")
    with pytest.raises(NonFiniteLossError, match=r"iteration 5: .*loss_cls=nan"):
        train(cfg, hooks=[PoisonAt(5)])
    ckpt_path = tmp_path / "nan" / "model_0000003.pth"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not os.path.exists(tmp_path / "nan" / "model_final.pth")
    resumed = train(cfg, resume=True)
    assert resumed.start_iter == 4 and resumed.iter == 8  # iter == MAX_ITER after success
    assert os.path.isfile(tmp_path / "nan" / "model_final.pth")


def test_every_checkpoint_loads_with_weights_only(tmp_path):
    trainer = train(small_cfg("lgd", tmp_path / "w", "SOLVER.MAX_ITER", 4))
    final = tmp_path / "w" / "model_final.pth"
    ckpt = torch.load(final, weights_only=True)
    assert {"model", "trainer", "iteration"} <= set(ckpt)
    student = tmp_path / "student.pth"
    kept, dropped = export_student(str(final), str(student))
    assert dropped > 0 and kept == len(torch.load(student, weights_only=True)["model"])
    assert trainer.iter == 4
