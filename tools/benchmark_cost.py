#!/usr/bin/env python
"""Training cost of baseline, FGFI and LGD: seconds per training iteration in each schedule phase,
peak memory, parameter counts, student inference time, the paper's "extra cost" metric, and the
arithmetic of one training iteration (forward + backward FLOPs, counted by PyTorch's
``torch.utils.flop_counter.FlopCounterMode``; fvcore's counter needs a jit trace, which cannot take
Detectron2's ``Instances`` inputs). Training-only FLOPs = everything counted while the
``distiller`` module runs (forward and backward): LGD's self-teacher, adapter and the student head's
pass on the teacher maps; FGFI's frozen teacher backbone and adapters. (The difference of two
methods' totals is not used: the number of sampled RoIs of random heads varies between runs.)

Each method runs in a fresh process on the same fixed synthetic batch (seeded images and boxes),
timing the project's own training step (``DistillTrainLoop.run_step``: forward, the one host
synchronisation, backward with the schedule's frozen parameters skipped, clipping, SGD).
Random weights with trainable BatchNorm (no downloads); FGFI's and UDFA's teachers are random too
(TEACHER.ALLOW_RANDOM_INIT), which costs the same as trained ones. UDFA's step (``--methods udfa``:
clean pass, input-gradient backward, adversarial pass, teacher pass, one backward) runs outside the
``distiller`` module's forward, so its training-only FLOPs are not separated (0 in that column).

What keeps the numbers stable (each was measured to move a CPU step by 15% to 2x):
* the learning rate is 0 by default (``--lr``): SGD still does all its arithmetic, but the weights
  stay at their initial values, so every timed step does the same RPN/NMS/RoI work. With a real LR
  a randomly initialised RPN collapses within a few steps (its boxes degenerate, the box head
  then sees only the GT boxes) and a baseline step falls from ~5 s to ~3.7 s while LGD's does not;
* denormals are flushed in every OpenMP thread (``lgd_detectron2.denormals``), and checked:
  ``torch.set_flush_denormal`` after the first parallel region reaches the calling thread only;
* glibc malloc keeps freed memory (MALLOC_MMAP_MAX_=0, a large MALLOC_TRIM_THRESHOLD_;
  ``--system-malloc`` turns this off): otherwise every step page-faults its large activations
  afresh (about 1 s of system time per baseline step at 512x640);
* a fixed thread count (``--threads``, default all cores) and warm-up steps before timing.
Wall time and process CPU time (all threads) are reported per step.

  python tools/benchmark_cost.py --methods baseline fgfi lgd --input-size 512 640 --batch 2 \\
      --iters 5 --warmup 3 --device cpu --json results/cost_cpu.json
"""
import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_NAMES = {
    "baseline": "faster_rcnn_R_50_FPN_2x_baseline.yaml",
    "fgfi": "faster_rcnn_R_50_FPN_2x_fgfi.yaml",
    "lgd": "faster_rcnn_R_50_FPN_2x_lgd.yaml",
    "teacher": "faster_rcnn_R_101_FPN_2x_baseline.yaml",  # FGFI's teacher pretraining
    "udfa": "faster_rcnn_R_50_FPN_udfa_1x_finetune.yaml",  # teacher = a copy of the baseline
}


def phases(cfg, method):
    """(name, iteration) of each schedule phase to time."""
    if method == "lgd":
        c = cfg.MODEL.LGD
        late = max(c.PRE_NONDISTILL_ITERS, c.PRE_FREEZE_STUDENT_BACKBONE_ITERS)
        return [("before PRE_NONDISTILL (backbone frozen)", 0), ("distillation on", late)]
    if method == "fgfi":
        return [("warm-up (imitation weight 0)", 0), ("imitation on", cfg.MODEL.FGFI.WARMUP_ITERS)]
    return [("all", 0)]


def synthetic_batch(batch, height, width, objects, num_classes, device, seed=0):
    import torch
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        wh = torch.rand(objects, 2, generator=g) * torch.tensor([width, height]) * 0.3 + 16
        xy = torch.rand(objects, 2, generator=g) * (torch.tensor([width, height]) - wh)
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(num_classes, (objects,), generator=g)
        image = torch.rand(3, height, width, generator=g) * 255
        out.append({"image": image.to(device), "height": height, "width": width,
                    "instances": inst.to(device)})
    return out


def training_flops(model, batch, iteration):
    """FLOPs of one training forward + backward (no optimizer step): total and the distiller's."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from detectron2.utils.events import EventStorage

    counter = FlopCounterMode(display=False)
    with counter, EventStorage(iteration):
        sum(model(batch).values()).backward()
    model.zero_grad(set_to_none=True)
    per_module = counter.get_flop_counts()
    distiller = [k for k in per_module if k.split(".")[-1] == "distiller"]
    return {
        "gflops_train_iter": counter.get_total_flops() / 1e9,
        "gflops_distiller_module": sum(per_module[distiller[0]].values()) / 1e9 if distiller else 0.0,
    }


def profile_step(loop, iteration, cuda):
    """Self time of one training step by op kind (convolutions forward and backward, matrix
    products, everything else) and the ten most expensive ops; CUDA time on a GPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from detectron2.utils.events import EventStorage

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof, EventStorage(iteration) as storage:
        loop.iter, loop.storage = iteration, storage
        loop.run_step()
    # device time is self_device_time_total in current PyTorch (self_cuda_time_total before 2.4)
    attrs = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
    kinds = {"conv": 0.0, "matmul": 0.0, "other": 0.0}
    ops = []
    for event in prof.key_averages():
        if cuda and event.device_type != DeviceType.CPU:
            continue  # a kernel: its time is already its launching op's self device time
        name = event.key
        seconds = next((getattr(event, a) for a in attrs if hasattr(event, a)), 0.0) / 1e6
        kind = ("conv" if "conv" in name else
                "matmul" if any(k in name for k in ("mm", "matmul", "linear", "addmm")) else "other")
        kinds[kind] += seconds
        ops.append((seconds, name, event.count))
    kinds["top_ops"] = [{"op": n, "s": round(t, 4), "calls": c} for t, n, c in sorted(ops, reverse=True)[:10]]
    return kinds


def run_single(args):
    import torch

    import lgd_detectron2  # noqa: F401
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from lgd_detectron2.config import get_distill_cfg
    from lgd_detectron2.denormals import denormal_slowdown, flush_denormals
    from lgd_detectron2.engine.trainer import DistillTrainLoop, build_optimizer

    cuda = args.device == "cuda"
    torch.set_num_threads(args.threads)
    cfg = get_distill_cfg()
    cfg.merge_from_file(os.path.join(args.config_dir, CONFIG_NAMES[args.single]))
    cfg.merge_from_list([
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device, "MODEL.RESNETS.NORM", "BN",
        "MODEL.FGFI.TEACHER.ALLOW_RANDOM_INIT", True, "MODEL.UDFA.TEACHER.ALLOW_RANDOM_INIT", True,
        "SOLVER.BASE_LR", args.lr, *args.opts,
    ])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    if model.__class__.__name__.startswith("Distill"):
        # Same student weights as the baseline's (built with the same seed), so that training
        # and inference do the same student work (random heads differ in detection counts).
        plain_cfg = cfg.clone()
        plain_cfg.MODEL.META_ARCHITECTURE = cfg.MODEL.META_ARCHITECTURE[len("Distill"):]
        torch.manual_seed(0)
        missing = model.load_state_dict(build_model(plain_cfg).state_dict(), strict=False).missing_keys
        assert all(k.startswith("distiller.") for k in missing), missing
    optimizer = build_optimizer(cfg, model)
    batch = synthetic_batch(args.batch, *args.input_size, args.objects,
                            cfg.MODEL.ROI_HEADS.NUM_CLASSES, args.device)
    denormal_ratio = None
    if not cuda:
        flush_denormals()
        denormal_ratio = denormal_slowdown()
        if denormal_ratio > 3:
            raise SystemExit(f"denormals are not flushed in every thread (a denormal matmul is "
                             f"{denormal_ratio:.0f}x slower than a normal one); timing would be wrong")
    distiller = getattr(model, "distiller", None)
    teacher = getattr(distiller, "teacher", None)
    n_student = sum(v.numel() for k, v in model.state_dict().items()
                    if not k.startswith("distiller.") and v.is_floating_point())
    result = {
        "method": args.single, "device": args.device, "input": [args.batch, 3, *args.input_size],
        "objects_per_image": args.objects, "amp": cfg.SOLVER.AMP.ENABLED,
        "amp_dtype": cfg.SOLVER.AMP.DTYPE if cfg.SOLVER.AMP.ENABLED else None,
        "threads": torch.get_num_threads(), "lr": args.lr, "denormal_slowdown": denormal_ratio,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "params_student": n_student,
        "params_training_only": sum(p.numel() for p in distiller.parameters()) if distiller else 0,
        "params_teacher": sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0,
        "max_iter": cfg.SOLVER.MAX_ITER, "phases": {},
    }
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # Inference and FLOPs first, while every method still has the baseline's student weights
    # (after training steps with a non-zero LR the weights differ, and so do detection counts).
    model.eval()
    single = [{k: v for k, v in batch[0].items() if k != "instances"}]
    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.iters):
            sync()
            start = time.perf_counter()
            model(single)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    result["inference_s_per_image"] = statistics.median(times)
    model.train()
    result.update(training_flops(model, batch, phases(cfg, args.single)[-1][1]))

    loop = DistillTrainLoop(model, itertools.repeat(batch), optimizer, amp=cfg.SOLVER.AMP.ENABLED,
                            amp_dtype=cfg.SOLVER.AMP.DTYPE)
    for name, iteration in phases(cfg, args.single):
        wall, cpu, rois = [], [], []
        for i in range(args.warmup + args.iters):
            with EventStorage(iteration) as storage:
                loop.iter, loop.storage = iteration, storage
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                loop.run_step()
                sync()
                elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
                sampled = [storage.latest().get(f"roi_head/num_{k}_samples") for k in ("fg", "bg")]
            if i >= args.warmup:
                wall.append(elapsed)
                cpu.append(elapsed_cpu)
                if None not in sampled:
                    rois.append(sampled[0][0] + sampled[1][0])
        result["phases"][name] = {
            "median": statistics.median(wall), "min": min(wall), "max": max(wall),
            "cpu_median": statistics.median(cpu), "all": wall,
            "rois_per_image": statistics.mean(rois) if rois else None,
            "gflops_per_s": result["gflops_train_iter"] / statistics.median(wall),
        }
    if args.profile:
        result["profile_s"] = profile_step(loop, phases(cfg, args.single)[-1][1], cuda)

    if cuda:
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["memory_kind"] = "CUDA max allocated"
    else:
        result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["memory_kind"] = "peak RSS"
    print("RESULT " + json.dumps(result), flush=True)


def child_env(args):
    """Environment of a measured process: threads, and (unless --system-malloc) glibc malloc
    settings that keep freed memory for reuse instead of unmapping it after every step."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    if not args.system_malloc:
        env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(64 * 2**30))
    return env


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["baseline", "fgfi", "lgd"],
                        choices=sorted(CONFIG_NAMES))
    parser.add_argument("--config-dir", default=os.path.join(REPO, "configs", "COCO-Detection"))
    parser.add_argument("--input-size", nargs=2, type=int, default=[512, 640], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--objects", type=int, default=5, help="objects per image")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lr", type=float, default=0.0,
                        help="SOLVER.BASE_LR of the timed steps (0: fixed weights, fixed work)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc malloc's defaults (freed memory goes back to the OS)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true",
                        help="profile one step of the last phase (CPU time, or CUDA time on a GPU); "
                             "print the share of each method's extra time outside convolutions")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every method")
    args = parser.parse_args()
    if args.single:
        return run_single(args)

    results = {}
    for method in args.methods:
        cmd = [sys.executable, os.path.abspath(__file__), "--single", method, "--config-dir", args.config_dir,
               "--input-size", *map(str, args.input_size), "--batch", str(args.batch), "--objects",
               str(args.objects), "--iters", str(args.iters), "--warmup", str(args.warmup),
               "--device", args.device, "--lr", str(args.lr), "--threads", str(args.threads),
               *(["--profile"] if args.profile else []), *args.opts]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args))
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{method} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results[method] = json.loads(lines[-1][len("RESULT "):])
        print(f"{method}: done", flush=True)

    base = results.get("baseline")
    base_step = base["phases"]["all"]["median"] if base else None
    rows = ["| method | phase | step s (median) | min | max | CPU s | x baseline | GFLOP/s | RoIs/img "
            "| peak MB | x baseline | student / training-only / teacher params (M) | inference s/img "
            "| train GFLOPs (x baseline) |",
            "|---" * 14 + "|"]
    for method, r in results.items():
        for phase, t in r["phases"].items():
            ratio = f"{t['median'] / base_step:.2f}" if base_step else "-"
            mem_ratio = f"{r['peak_memory_mb'] / base['peak_memory_mb']:.2f}" if base else "-"
            rois = f"{t['rois_per_image']:.0f}" if t.get("rois_per_image") else "-"
            rows.append(
                f"| {method} | {phase} | {t['median']:.3f} | {t['min']:.3f} | {t['max']:.3f} "
                f"| {t['cpu_median']:.2f} | {ratio} | {t['gflops_per_s']:.0f} | {rois} "
                f"| {r['peak_memory_mb']:.0f} | {mem_ratio} | {r['params_student'] / 1e6:.1f} / "
                f"{r['params_training_only'] / 1e6:.2f} / {r['params_teacher'] / 1e6:.1f} "
                f"| {r['inference_s_per_image']:.3f} | {r['gflops_train_iter']:.0f}"
                + (f" ({r['gflops_train_iter'] / base['gflops_train_iter']:.2f})" if base else "") + " |"
            )
    if base:
        rows.append("")
        for method, r in results.items():
            if r["gflops_distiller_module"]:
                rows.append(
                    f"{method}: training-only arithmetic {r['gflops_distiller_module']:.0f} GFLOPs per "
                    f"iteration (forward + backward inside the distiller), "
                    f"{r['gflops_distiller_module'] / base['gflops_train_iter']:.2f} x the baseline's "
                    f"{base['gflops_train_iter']:.0f}"
                )
    summary = {"results": results}
    if base_step:
        # The paper's metric: extra cost beyond student learning, in step-seconds x iterations.
        def main_phase(r):
            return list(r["phases"].values())[-1]["median"]

        extra = {}
        for method in ("lgd", "fgfi"):
            if method in results:
                r = results[method]
                extra[method] = (main_phase(r) - base_step) * r["max_iter"]
        if "fgfi" in extra and "teacher" in results:
            extra["fgfi"] += main_phase(results["teacher"]) * results["teacher"]["max_iter"]
        summary["extra_cost_step_seconds"] = extra
        if "lgd" in extra and "fgfi" in extra and "teacher" in results:
            summary["lgd_over_fgfi_extra"] = extra["lgd"] / extra["fgfi"]
            rows.append("")
            rows.append(f"Extra training cost beyond the student (step-s x iterations): LGD "
                        f"{extra['lgd']:.0f}, FGFI {extra['fgfi']:.0f} (incl. teacher pretraining); "
                        f"LGD / FGFI = {summary['lgd_over_fgfi_extra']:.2f}")
    if base and "profile_s" in base:
        for method, r in results.items():
            if method in ("lgd", "fgfi") and "profile_s" in r:
                p, b = r["profile_s"], base["profile_s"]
                extra = {k: p[k] - b[k] for k in ("conv", "matmul", "other")}
                total = sum(extra.values())
                rows.append(
                    f"{method}: profiled extra step time {total:.3f} s = conv {extra['conv']:.3f} + "
                    f"matmul {extra['matmul']:.3f} + other {extra['other']:.3f}"
                    + (f" (outside convolutions: {100 * (1 - extra['conv'] / total):.0f}%)" if total > 0 else "")
                )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
