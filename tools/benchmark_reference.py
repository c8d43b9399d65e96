#!/usr/bin/env python
"""An independent step timer, to check tools/benchmark_cost.py against.

It shares only the model builder and the synthetic batch with benchmark_cost.py: no project
trainer, no gradient clipping, no EventStorage bookkeeping beyond what the model needs, a plain
``torch.optim.SGD`` over all trainable parameters and ``time.perf_counter`` around
forward + backward + step, every variant in its own fresh process, in one run. The environment
rules are the same (they decide whether a CPU measurement means anything; see benchmark_cost.py):
denormals flushed in every thread and checked, glibc malloc keeping freed memory, fixed threads,
learning rate 0 (fixed weights, so every step does the same RPN/RoI work), warm-up steps.

  python tools/benchmark_reference.py --variants baseline lgd --input-size 512 640 --batch 2 \\
      --iters 5 --warmup 3
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_cost import CONFIG_NAMES, REPO, child_env, synthetic_batch  # noqa: E402


def run_single(args):
    import torch

    import lgd_detectron2  # noqa: F401
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from lgd_detectron2.config import get_distill_cfg
    from lgd_detectron2.denormals import denormal_slowdown, flush_denormals

    torch.set_num_threads(args.threads)
    cfg = get_distill_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "COCO-Detection", CONFIG_NAMES[args.single]))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN",
                         "MODEL.FGFI.TEACHER.ALLOW_RANDOM_INIT", True, *args.opts])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    flush_denormals()
    if denormal_slowdown() > 3:
        raise SystemExit("denormals are not flushed in every thread")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=1e-4)
    batch = synthetic_batch(args.batch, *args.input_size, args.objects, cfg.MODEL.ROI_HEADS.NUM_CLASSES, "cpu")
    # the iteration where every schedule switch is past (distillation on, backbone free)
    iteration = cfg.SOLVER.MAX_ITER - 1 - cfg.MODEL.LGD.POST_NONDISTILL_ITERS
    times = []
    for i in range(args.warmup + args.iters):
        start = time.perf_counter()
        with EventStorage(iteration):
            losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    print("RESULT " + json.dumps({"variant": args.single, "median": statistics.median(times),
                                  "min": min(times), "max": max(times), "all": times}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["baseline", "lgd"], choices=sorted(CONFIG_NAMES))
    parser.add_argument("--input-size", nargs=2, type=int, default=[512, 640], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--objects", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--system-malloc", action="store_true")
    parser.add_argument("--compare-with", default=None,
                        help="a benchmark_cost.py --json file: print each variant's ratio to it")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.single:
        return run_single(args)
    results = {}
    for variant in args.variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--single", variant, "--input-size",
               *map(str, args.input_size), "--batch", str(args.batch), "--objects", str(args.objects),
               "--iters", str(args.iters), "--warmup", str(args.warmup), "--threads", str(args.threads),
               *args.opts]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args))
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{variant} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results[variant] = json.loads(lines[-1][len("RESULT "):])
    other = None
    if args.compare_with:
        with open(args.compare_with) as f:
            other = json.load(f)["results"]
    base = results.get("baseline", {}).get("median")
    print("| variant | step s (median) | min | max | x baseline | benchmark_cost.py s | this / that |")
    print("|---|---|---|---|---|---|---|")
    for v, r in results.items():
        that = list(other[v]["phases"].values())[-1]["median"] if other and v in other else None
        ratio = f"{r['median'] / base:.2f}" if base else "-"
        that_cell = f"{that:.3f} | {r['median'] / that:.2f}" if that else "- | -"
        print(f"| {v} | {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f} | {ratio} | {that_cell} |")

if __name__ == "__main__":
    main()
