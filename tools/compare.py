#!/usr/bin/env python
"""`make compare`: baseline, FGFI and LGD on the built-in data, same student recipe, several seeds.

Trains the FGFI teacher (the R-34 demo baseline) first, then every (method, seed) run, evaluates
each on demo_shapes_val, and writes
  results/compare.json      every run's bbox AP / AP50 / AP75 / APs / APm / APl and minutes
  results/compare.md        mean and spread (min-max) per method
  results/compare_ap.png    AP and AP50 per method (mean, with each seed as a dot)
  results/compare_losses.png total and per-term training loss curves (seed of the first run)

  python tools/compare.py [--seeds 1 2] [--parallel 2]
"""
import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from run_demo import METRICS, REPO, train

METHODS = ("baseline", "fgfi", "lgd")


def summarise(runs):
    lines = ["| method | seeds | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for method in METHODS:
        rows = [r for r in runs if r["method"] == method]
        if not rows:
            continue
        cells = []
        for m in METRICS:
            vals = [r[m] for r in rows]
            cells.append(f"{statistics.mean(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})")
        lines.append(f"| {method} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs, output_root, results_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("AP", "AP50")):
        for i, method in enumerate(METHODS):
            vals = [r[metric] for r in runs if r["method"] == method]
            if vals:
                ax.bar(i, statistics.mean(vals), color="C%d" % i, alpha=0.6)
                ax.scatter([i] * len(vals), vals, color="k", s=12, zorder=3)
        ax.set_xticks(range(len(METHODS)), METHODS)
        ax.set_title(f"bbox {metric} on demo_shapes_val")
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, "compare_ap.png"), dpi=100)

    seed = min(r["seed"] for r in runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, method in enumerate(METHODS):
        path = os.path.join(output_root, f"{method}_seed{seed}", "metrics.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        rows = [r for r in rows if "total_loss" in r]
        its = [r["iteration"] for r in rows]
        axes[0].plot(its, [r["total_loss"] for r in rows], label=method, color="C%d" % i)
        for key in sorted(k for k in rows[0] if k.startswith("loss")):
            style = "--" if ("tea" in key or "distill" in key or "fgfi" in key) else "-"
            axes[1].plot(its, [r.get(key, float("nan")) for r in rows], style,
                         label=f"{method}: {key}", color="C%d" % i, alpha=0.7)
    axes[0].set_title(f"total loss (seed {seed})")
    axes[1].set_title("per-term losses")
    axes[1].set_yscale("log")
    axes[0].legend()
    axes[1].legend(fontsize=6, ncol=2)
    for ax in axes:
        ax.set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, "compare_losses.png"), dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--output-root", default=os.path.join(REPO, "output", "compare"))
    parser.add_argument("--results-dir", default=os.path.join(REPO, "results"))
    args = parser.parse_args()
    os.makedirs(args.results_dir, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // args.parallel)
    start = time.time()
    teacher_weights = os.path.join(args.output_root, "teacher_seed1", "model_final.pth")

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        teacher = pool.submit(train, "teacher", 1, args.output_root, (), threads)

        def run(method, seed):
            extra = ()
            if method == "fgfi":
                teacher.result()  # FGFI needs the trained teacher
                extra = ("MODEL.FGFI.TEACHER.WEIGHTS", teacher_weights)
            return train(method, seed, args.output_root, extra, threads)

        order = [(m, s) for s in args.seeds for m in ("baseline", "lgd")] + [("fgfi", s) for s in args.seeds]
        futures = {job: pool.submit(run, *job) for job in order}
        results = {job: f.result() for job, f in futures.items()}
        teacher_res, teacher_min = teacher.result()

    runs = [{"method": m, "seed": s, "minutes": round(t, 2), **r} for (m, s), (r, t) in results.items()]
    report = {"runs": runs, "teacher": {"minutes": round(teacher_min, 2), **teacher_res},
              "total_minutes": round((time.time() - start) / 60, 1)}
    with open(os.path.join(args.results_dir, "compare.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = summarise(runs)
    md = (f"bbox AP on demo_shapes_val, mean (min-max) over seeds {args.seeds}; FGFI teacher (R-34 demo "
          f"baseline) AP {teacher_res['AP']:.1f} / AP50 {teacher_res['AP50']:.1f}. "
          f"`make compare` took {report['total_minutes']} min.\n\n{table}\n")
    with open(os.path.join(args.results_dir, "compare.md"), "w") as f:
        f.write(md)
    plot(runs, args.output_root, args.results_dir)
    print(md)


if __name__ == "__main__":
    main()
