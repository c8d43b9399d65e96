#!/usr/bin/env python
"""`make compare` / `make compare-quick`: the comparison protocol on the built-in data.

Every row trains the demo student (R-18-FPN from scratch, configs/Demo/) with one recipe, the
protocol below, on demo_shapes_train and evaluates it on demo_shapes_val every EVAL_PERIOD
iterations, for several seeds. Rows (full protocol): the FGFI teacher (R-34, trained once, twice
the iterations), baseline, FGFI, LGD, LGD without P2; quick: baseline and LGD, 2 seeds. For LGD
rows the self-teacher's oracle AP (MODEL.LGD.EVAL_TEACHER: the student's head on the teacher's
maps, built from the GT labels) is evaluated from the checkpoint of every evaluation step with
the stock `--eval-only`.

Statistics: per row the mean and sample standard deviation of the final AP over seeds; per row
and seed the difference to the baseline of the same seed (same data order and initialisation
seed), its mean and a 95% t-interval (t quantile with n-1 degrees of freedom). A difference is
*resolved* when its interval excludes 0.

Writes (under --results-dir, default results/):
  compare.json         every run: final AP..APl, the AP curve, the teacher-oracle curve, minutes
  compare.md           the table (mean +- std, paired difference with 95% CI, resolved or not)
  compare_ap.png       (compare_quick_ap.png for --quick) AP over iterations per row: mean line, min-max band over seeds; LGD's
                       teacher oracle dashed beside its student
  compare_losses.png   (compare_quick_losses.png) total and per-term training losses, mean over seeds

  python tools/compare.py [--quick] [--seeds 1 2 3] [--rows baseline lgd ...] [--parallel 2]
                          [--reuse] [CONFIG OVERRIDES for every row]
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from run_demo import METRICS, REPO, config_file, train

# The protocol recipe (on top of configs/Demo/Base-Demo-RCNN-FPN.yaml), chosen by measurement:
# see docs/RESULTS.md ("Comparison protocol") for the pilot runs behind each number.
MAX_ITER = 800
LR_STEP = 480  # LR x0.1 at 60%: the last quarter runs at the low LR (convergence check)
PROTOCOL = (
    "SOLVER.MAX_ITER", MAX_ITER, "SOLVER.STEPS", (LR_STEP,), "SOLVER.WARMUP_ITERS", 100,
    "SOLVER.BASE_LR", 0.02, "TEST.EVAL_PERIOD", 100, "SOLVER.CHECKPOINT_PERIOD", 100,
)
# LGD's released schedule (30k pre-nondistill, 20k backbone freeze of 180k) scaled to MAX_ITER
LGD_SCHEDULE = ("MODEL.LGD.PRE_NONDISTILL_ITERS", round(MAX_ITER * 30 / 180),
                "MODEL.LGD.PRE_FREEZE_STUDENT_BACKBONE_ITERS", round(MAX_ITER * 20 / 180))
ROWS = {  # row -> (config method, extra overrides)
    "baseline": ("baseline", ()),
    "fgfi": ("fgfi", ()),
    "lgd": ("lgd", LGD_SCHEDULE),
    "lgd_noP2": ("lgd", LGD_SCHEDULE + ("MODEL.LGD.IN_FEATURES", '["p3","p4","p5","p6"]')),
}
FULL_ROWS = ("baseline", "fgfi", "lgd", "lgd_noP2")
QUICK_ROWS = ("baseline", "lgd")
# two-sided 95% t quantiles, degrees of freedom 1..10
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_results(results_dir, name, data, markdown):
    """``results_dir/<name>.json`` (every run) and ``<name>.md`` (the table), the latter printed."""
    with open(os.path.join(results_dir, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(results_dir, f"{name}.md"), "w") as f:
        f.write(markdown)
    print(markdown)


def last_evaluation(out_dir, key, what):
    """The last metrics.json row of a run that holds ``key`` (its final evaluation)."""
    rows = [r for r in read_metrics(out_dir) if key in r]
    if not rows:
        raise RuntimeError(f"no {what} in {out_dir}/metrics.json")
    return rows[-1]


def ap_curve(out_dir):
    """[(iteration, bbox AP)] of every evaluation train_net.py ran during training."""
    rows = read_metrics(out_dir)
    return [(r["iteration"] + 1, r["bbox/AP"]) for r in rows if "bbox/AP" in r]


def run_metrics(out_dir):
    rows = [r for r in read_metrics(out_dir) if "bbox/AP" in r]
    if not rows:
        raise RuntimeError(f"no bbox evaluation in {out_dir}/metrics.json")
    return {m: rows[-1][f"bbox/{m}"] for m in METRICS}


def teacher_oracle_curve(row_dir, method, extra, threads):
    """AP of LGD's self-teacher oracle at every saved checkpoint (stock --eval-only)."""
    checkpoints = sorted(f for f in os.listdir(row_dir) if f.startswith("model_") and f.endswith(".pth"))
    curve = []
    for name in checkpoints:
        iteration = MAX_ITER if name == "model_final.pth" else int(name[6:-4]) + 1
        if iteration in {i for i, _ in curve}:
            continue
        out = os.path.join(row_dir, "teacher_eval", name[:-4])
        cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--eval-only",
               "--config-file", config_file(method), *map(str, PROTOCOL), *map(str, extra),
               "MODEL.LGD.EVAL_TEACHER", "True", "MODEL.WEIGHTS", os.path.join(row_dir, name),
               "OUTPUT_DIR", out]
        ap = logged_ap(out + ".log")
        if ap is None:  # not evaluated yet (or interrupted)
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
            os.makedirs(out, exist_ok=True)
            with open(out + ".log", "w") as log:
                subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
            ap = logged_ap(out + ".log")
        curve.append((iteration, ap))
    return sorted(curve)


def logged_ap(log_path):
    """bbox AP from a train_net.py --eval-only log ("copypaste: AP,AP50,..." then the numbers)."""
    if not os.path.exists(log_path):
        return None
    with open(log_path) as log:
        lines = log.read().splitlines()
    values = [l for i, l in enumerate(lines) if i and "copypaste: AP,AP50" in lines[i - 1]]
    return float(values[0].split("copypaste:")[1].split(",")[0]) if values else None


def training_minutes(row_dir):
    """Detectron2's "Total training time" of a run (its log beside the run folder), in minutes."""
    try:
        with open(row_dir + ".log") as f:
            line = [l for l in f if "Total training time:" in l][-1]
    except (OSError, IndexError):
        return None
    h, m, sec = line.split("Total training time:")[1].split()[0].split(":")
    return round(int(h) * 60 + int(m) + int(sec) / 60, 2)


def t_interval(diffs):
    """(mean, half-width of the 95% t-interval) of paired differences."""
    n = len(diffs)
    mean = statistics.mean(diffs)
    if n < 2:
        return mean, float("inf")
    return mean, T975[min(n - 1, len(T975)) - 1] * statistics.stdev(diffs) / math.sqrt(n)


def spread_cell(values):
    """A row's values over seeds as a table cell: mean (min-max)."""
    spread = f" ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{spread}"


def paired_cell(diffs):
    """(table cell, verdict) of seed-paired differences: mean (95% t-interval), "unresolved" when
    the interval contains 0."""
    mean, half = t_interval(diffs)
    resolved = abs(mean) > half
    cell = f"{mean:+.1f} ({mean - half:+.1f} to {mean + half:+.1f})" + ("" if resolved else ", unresolved")
    return cell, {"diff": mean, "ci": [mean - half, mean + half], "resolved": resolved, "n": len(diffs)}


def summarise(runs, rows):
    base = {r["seed"]: r["AP"] for r in runs if r["row"] == "baseline"}
    lines = ["| row | seeds | AP mean +- std | AP per seed | AP50 mean | paired AP diff to baseline "
             "(95% CI) | resolved | last-quarter AP gain | train min per run |",
             "|---|---|---|---|---|---|---|---|---|"]
    verdicts = {}
    for row in rows:
        rs = sorted((r for r in runs if r["row"] == row), key=lambda r: r["seed"])
        if not rs:
            continue
        aps = [r["AP"] for r in rs]
        std = statistics.stdev(aps) if len(aps) > 1 else float("nan")
        gains = [r["last_quarter_gain"] for r in rs if r.get("last_quarter_gain") is not None]
        diff_cell, resolved = "-", "-"
        if row != "baseline":
            diffs = [r["AP"] - base[r["seed"]] for r in rs if r["seed"] in base]
            if diffs:
                mean, half = t_interval(diffs)
                diff_cell = f"{mean:+.1f} ({mean - half:+.1f} to {mean + half:+.1f})"
                resolved = "yes" if abs(mean) > half else "no"
                verdicts[row] = {"diff": mean, "ci": [mean - half, mean + half],
                                 "resolved": resolved == "yes", "n": len(diffs)}
        lines.append(
            f"| {row} | {len(rs)} | {statistics.mean(aps):.1f} +- {std:.1f} "
            f"| {' / '.join(f'{a:.1f}' for a in aps)} "
            f"| {statistics.mean(r['AP50'] for r in rs):.1f} | {diff_cell} | {resolved} "
            f"| {statistics.mean(gains):+.1f} | "
            f"{statistics.mean(r['train_minutes'] for r in rs):.1f} |"
        )
    return "\n".join(lines), verdicts


def last_quarter_gain(curve):
    """AP at the end minus AP at the last evaluation at or before 3/4 of training."""
    if not curve:
        return None
    early = [ap for it, ap in curve if it <= 0.75 * MAX_ITER]
    return curve[-1][1] - early[-1] if early else None


def plot(runs, rows, output_root, results_dir, name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, row in enumerate(rows):
        rs = [r for r in runs if r["row"] == row]
        for key, style, label in (("curve", "-", row), ("teacher_curve", "--", f"{row}: self-teacher oracle")):
            curves = [r[key] for r in rs if r.get(key)]
            if not curves:
                continue
            its = sorted({it for c in curves for it, _ in c})
            by_it = [[dict(c)[it] for c in curves if it in dict(c)] for it in its]
            ax.plot(its, [statistics.mean(v) for v in by_it], style, color=f"C{i}", label=label)
            ax.fill_between(its, [min(v) for v in by_it], [max(v) for v in by_it], color=f"C{i}", alpha=0.15)
    ax.set_xlabel("iteration")
    ax.set_ylabel("bbox AP on demo_shapes_val")
    ax.set_title("AP over training: mean over seeds, band = min-max")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, f"{name}_ap.png"), dpi=100)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, row in enumerate(rows):
        series = {}
        for r in (r for r in runs if r["row"] == row):
            for m in read_metrics(os.path.join(output_root, f"{row}_seed{r['seed']}")):
                for k, v in m.items():
                    if k == "total_loss" or k.startswith("loss"):
                        series.setdefault(k, {}).setdefault(m["iteration"], []).append(v)
        for k, pts in sorted(series.items()):
            its = sorted(pts)
            vals = [statistics.mean(pts[it]) for it in its]
            if k == "total_loss":
                axes[0].plot(its, vals, color=f"C{i}", label=row)
            else:
                style = "--" if ("tea" in k or "distill" in k or "fgfi" in k) else "-"
                axes[1].plot(its, vals, style, color=f"C{i}", alpha=0.7, label=f"{row}: {k}")
    axes[0].set_title("total training loss (mean over seeds)")
    axes[1].set_title("per-term losses")
    axes[1].set_yscale("log")
    axes[0].legend()
    axes[1].legend(fontsize=5, ncol=2)
    for ax in axes:
        ax.set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, f"{name}_losses.png"), dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="baseline and LGD, 2 seeds")
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--output-root", default=None)
    parser.add_argument("--results-dir", default=os.path.join(REPO, "results"))
    parser.add_argument("--reuse", action="store_true", help="keep finished runs (model_final.pth) and teacher-oracle evaluations")
    parser.add_argument("--summarise-only", action="store_true",
                        help="train nothing: the table and plots of the finished runs among --rows x --seeds")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every row")
    args = parser.parse_args()
    rows = tuple(args.rows or (QUICK_ROWS if args.quick else FULL_ROWS))
    seeds = args.seeds or ([1, 2] if args.quick else [1, 2, 3])
    name = "compare_quick" if args.quick else "compare"
    output_root = args.output_root or os.path.join(REPO, "output", name)
    os.makedirs(args.results_dir, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // args.parallel)
    start = time.time()
    teacher_weights = os.path.join(output_root, "teacher_seed1", "model_final.pth")
    subprocess.run([sys.executable, "-W", "ignore", "-c",
                    "import lgd_detectron2.data as d; d.ensure_demo_data()"], cwd=REPO, check=True)

    def finished(row, seed):
        path = os.path.join(output_root, f"{row}_seed{seed}")
        return args.reuse and os.path.exists(os.path.join(path, "model_final.pth"))

    def run_row(row, seed, teacher=None):
        method, extra = ROWS[row]
        extra = (*PROTOCOL, *extra, *args.opts)
        if method == "fgfi":
            teacher.result()
            extra = (*extra, "MODEL.FGFI.TEACHER.WEIGHTS", teacher_weights)
        row_dir = os.path.join(output_root, f"{row}_seed{seed}")
        t0 = time.time()
        if finished(row, seed):
            metrics, minutes = run_metrics(row_dir), None
        else:
            metrics, minutes = train(method, seed, output_root, tuple(map(str, extra)), threads,
                                     metrics=run_metrics, run_name=row)
        curve = ap_curve(row_dir)
        result = {"row": row, "seed": seed, "minutes": minutes, **metrics, "curve": curve,
                  "train_minutes": training_minutes(row_dir),
                  "last_quarter_gain": last_quarter_gain(curve)}
        if method == "lgd":
            result["teacher_curve"] = teacher_oracle_curve(row_dir, method, extra, threads)
            result["teacher_eval_minutes"] = round((time.time() - t0) / 60 - (minutes or 0), 2)
        return result

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        teacher = None
        if "fgfi" in rows:
            teacher_extra = tuple(map(str, (*PROTOCOL, "SOLVER.MAX_ITER", 2 * MAX_ITER,
                                            "SOLVER.STEPS", (2 * LR_STEP,), *args.opts)))
            if (args.reuse or args.summarise_only) and os.path.exists(teacher_weights):
                teacher = pool.submit(lambda: (run_metrics(os.path.dirname(teacher_weights)), None))
            elif not args.summarise_only:
                teacher = pool.submit(train, "teacher", 1, output_root, teacher_extra, threads,
                                      metrics=run_metrics)
        # FGFI rows last (they wait for the teacher, which trains meanwhile), then the longest
        # rows first so the workers finish together
        order = sorted(((r, s) for s in seeds for r in rows),
                       key=lambda j: (j[0] == "fgfi", j[0] == "baseline", j[1]))
        if args.summarise_only:
            args.reuse = True
            order = [(r, s) for r, s in order if finished(r, s)]
        futures = [pool.submit(run_row, r, s, teacher) for r, s in order]
        runs = [f.result() for f in futures]
        teacher_result = teacher.result() if teacher else None

    table, verdicts = summarise(runs, rows)
    total = round((time.time() - start) / 60, 1)
    report = {"protocol": list(map(str, PROTOCOL)), "lgd_schedule": list(LGD_SCHEDULE), "seeds": seeds,
              "runs": runs, "verdicts": verdicts, "total_minutes": total}
    header = f"bbox AP on demo_shapes_val (150 images) after {MAX_ITER} iterations, seeds {seeds}; "
    if args.summarise_only:
        header += "assembled from finished runs (--summarise-only); minutes: each run's training time."
    else:
        header += (f"`{'make compare-quick' if args.quick else 'make compare'}` took {total} min on "
                   f"{os.cpu_count()} CPU cores ({args.parallel} runs in parallel).")
    if teacher_result:
        report["teacher"] = {"minutes": teacher_result[1], **teacher_result[0]}
        header += f" FGFI teacher (R-34, {2 * MAX_ITER} iterations): AP {teacher_result[0]['AP']:.1f}."
    md = f"{header}\n\n{table}\n"
    oracle = [r for r in runs if r.get("teacher_curve")]
    if oracle:
        md += "\nSelf-teacher oracle AP at the end of training (student AP beside it):\n\n"
        for r in oracle:
            md += f"- {r['row']} seed {r['seed']}: oracle {r['teacher_curve'][-1][1]:.1f}, student {r['AP']:.1f}\n"
    with open(os.path.join(args.results_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.results_dir, f"{name}.md"), "w") as f:
        f.write(md)
    plot(runs, rows, output_root, args.results_dir, name)
    print(md)


if __name__ == "__main__":
    main()
