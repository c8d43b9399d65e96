#!/usr/bin/env python
"""`make demo`: train the demo baseline and the demo LGD student on the built-in data with the same
recipe and seed, evaluate both on the built-in validation split, print their bbox AP side by side.

The runs go in parallel, one CPU thread each, so that both cores of a 2-core machine work.

  python tools/run_demo.py [--family faster_rcnn] [--methods baseline lgd] [--seeds 1]
                           [--parallel 2] [CONFIG OVERRIDES]

--family picks the detector: faster_rcnn (default), retinanet, fcos or mask_rcnn
(configs/Demo/<family>_R_18_FPN_<method>.yaml; Mask R-CNN also reports mask AP).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("faster_rcnn", "retinanet", "fcos", "mask_rcnn")
TEACHER_CONFIG = "configs/Demo/faster_rcnn_R_34_FPN_teacher.yaml"  # FGFI's demo teacher
# classification pretraining of the R-18 body (the built-in data's stand-in for ImageNet)
PRETRAIN_CONFIG = "configs/Demo/wsod_R_18_pretrain.yaml"
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def config_file(method, family="faster_rcnn"):
    if method == "teacher":
        return TEACHER_CONFIG
    if method == "pretrain":
        return PRETRAIN_CONFIG
    return f"configs/Demo/{family}_R_18_FPN_{method}.yaml"


def final_metrics(out_dir):
    """The last evaluation that train_net.py wrote into metrics.json: bbox AP..APl, plus
    mask_AP / mask_AP50 when there is a segm evaluation."""
    with open(os.path.join(out_dir, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in rows if "bbox/AP" in r]
    if not evals:
        raise RuntimeError(f"no bbox evaluation in {out_dir}/metrics.json")
    result = {m: evals[-1][f"bbox/{m}"] for m in METRICS}
    if "segm/AP" in evals[-1]:
        result.update(mask_AP=evals[-1]["segm/AP"], mask_AP50=evals[-1]["segm/AP50"])
    return result


def train(method, seed, output_root, extra=(), threads=1, family="faster_rcnn", metrics=None,
          run_name=None):
    """Run tools/train_net.py (train + final evaluation) in a subprocess; return (AP dict, minutes).
    ``metrics(out_dir)`` reads the AP dict (default ``final_metrics``); the run's folder is
    ``<output_root>/<run_name or method>_seed<seed>``."""
    out_dir = os.path.join(output_root, f"{run_name or method}_seed{seed}")
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
           config_file(method, family), "SEED", str(seed), "OUTPUT_DIR", out_dir, *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    print("+", " ".join(cmd), flush=True)
    start = time.time()
    os.makedirs(output_root, exist_ok=True)
    with open(out_dir + ".log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{run_name or method} (seed {seed}) failed; see {out_dir}.log")
    minutes = (time.time() - start) / 60
    print(f"  {run_name or method} seed {seed}: trained and evaluated in {minutes:.1f} min ({out_dir})", flush=True)
    return (metrics or final_metrics)(out_dir), minutes


def train_all(jobs, output_root, extra=(), parallel=2, family="faster_rcnn"):
    """jobs: list of (method, seed). Returns {(method, seed): (metrics, minutes)}."""
    threads = max(1, (os.cpu_count() or 2) // parallel)
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {job: pool.submit(train, *job, output_root, extra, threads, family) for job in jobs}
        return {job: f.result() for job, f in futures.items()}


def markdown_table(results):
    metrics = list(METRICS)
    if all("mask_AP" in res for res, _ in results.values()):
        metrics += ["mask_AP", "mask_AP50"]
    lines = ["| method | seed | " + " | ".join(metrics) + " | train+eval min |",
             "|---" * (len(metrics) + 3) + "|"]
    for (method, seed), (res, minutes) in results.items():
        lines.append(f"| {method} | {seed} | " + " | ".join(f"{res[k]:.1f}" for k in metrics)
                     + f" | {minutes:.1f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="faster_rcnn", choices=FAMILIES)
    parser.add_argument("--methods", nargs="+", default=["baseline", "lgd"], choices=["baseline", "lgd"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--output-root", default=None,
                        help="default: output/demo (Faster R-CNN) or output/demo_<family>")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run")
    args = parser.parse_args()
    if args.output_root is None:
        suffix = "" if args.family == "faster_rcnn" else f"_{args.family}"
        args.output_root = os.path.join(REPO, "output", "demo" + suffix)
    start = time.time()
    # generate the built-in data once, before the parallel runs
    subprocess.run([sys.executable, "-W", "ignore", "-c",
                    "import lgd_detectron2.data as d; d.ensure_demo_data()"], cwd=REPO, check=True)
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    results = train_all(jobs, args.output_root, args.opts, args.parallel, args.family)
    print(f"\n{args.family}: AP on demo_shapes_val (150 images); all runs took "
          f"{(time.time() - start) / 60:.1f} min")
    print(markdown_table(results))
    with open(os.path.join(args.output_root, "results.json"), "w") as f:
        json.dump([{"method": m, "seed": s, **r} for (m, s), (r, _) in results.items()], f, indent=1)


if __name__ == "__main__":
    main()
