#!/usr/bin/env python
"""`make demo`: train the demo baseline and the demo LGD student on the built-in data with the same
recipe and seed, evaluate both on the built-in validation split, print their bbox AP side by side.

  python tools/run_demo.py [--methods baseline lgd] [--seed 1] [--output-root output/demo]
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "baseline": "configs/Demo/faster_rcnn_R_18_FPN_baseline.yaml",
    "lgd": "configs/Demo/faster_rcnn_R_18_FPN_lgd.yaml",
}
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def final_bbox_metrics(out_dir):
    """The last bbox evaluation that train_net.py wrote into metrics.json."""
    with open(os.path.join(out_dir, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in rows if "bbox/AP" in r]
    if not evals:
        raise RuntimeError(f"no bbox evaluation in {out_dir}/metrics.json")
    return {m: evals[-1][f"bbox/{m}"] for m in METRICS}


def train(method, seed, output_root, extra):
    out_dir = os.path.join(output_root, f"{method}_seed{seed}")
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
           CONFIGS[method], "SEED", str(seed), "OUTPUT_DIR", out_dir, *extra]
    print("+", " ".join(cmd), flush=True)
    start = time.time()
    with open(os.path.join(output_root, f"{method}_seed{seed}.log"), "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed; see {log.name}")
    minutes = (time.time() - start) / 60
    print(f"  {method}: trained and evaluated in {minutes:.1f} min ({out_dir})", flush=True)
    return final_bbox_metrics(out_dir), minutes


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=["baseline", "lgd"], choices=sorted(CONFIGS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output-root", default=os.path.join(REPO, "output", "demo"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run")
    args = parser.parse_args()
    os.makedirs(args.output_root, exist_ok=True)
    results = {m: train(m, args.seed, args.output_root, args.opts) for m in args.methods}

    print("\nbbox AP on demo_shapes_val (150 images), seed", args.seed)
    print("| method | " + " | ".join(METRICS) + " | train+eval min |")
    print("|---" * (len(METRICS) + 2) + "|")
    for m, (res, minutes) in results.items():
        print(f"| {m} | " + " | ".join(f"{res[k]:.1f}" for k in METRICS) + f" | {minutes:.1f} |")
    with open(os.path.join(args.output_root, f"results_seed{args.seed}.json"), "w") as f:
        json.dump({m: r for m, (r, _) in results.items()}, f, indent=1)


if __name__ == "__main__":
    main()
