#!/usr/bin/env python
"""`make compare-adv`: the UDFA protocol on the built-in data (Xu et al. 2021, as the paper's:
every row fine-tunes one trained detector for the same budget).

1. start: the demo baseline (configs/Demo/faster_rcnn_R_18_FPN_baseline.yaml, seed 1, 400 it),
   trained once; its clean and attacked AP are the "start" row.
2. rows, each fine-tuning the start checkpoint for 200 iterations with the same LR schedule
   (configs/Demo/Base-Demo-RCNN-FPN-finetune.yaml), per seed:
     finetune     clean images only (the equal-budget control)
     adv_train    detection loss on adversarial images only
     udfa         0.5 clean + 0.5 adversarial loss + KDFA + SSFA + clean-KD, frozen teacher = start
     udfa_self    0.5 + 0.5 + SSFA only (no teacher)
     udfa_aux_bn  udfa with separate BatchNorm for adversarial inputs (MODEL.UDFA.AUX_BN)
3. each run's final evaluation (train_net.py), each attack against the model under test on its
   total detection loss, on 0-255 pixels (lgd_detectron2/udfa/attack.py):
     demo_shapes_val      clean
     demo_shapes_val_adv  TEST.ADV: one signed-gradient step of 2 within eps 8, no random start
                          (the release's "robust mAP" attack: the step never reaches eps)
     demo_shapes_val_pgd  TEST.PGD: PGD, 10 steps of 2 within eps 8 from a random start in +-eps/2
                          (the budget binds; about 8x the cost of the single step: some 6 min per
                          evaluation of the 150 images on one thread)

Statistics per row: mean and min-max over seeds of clean, single-step and PGD AP; the seed-paired
difference to ``finetune`` (same seed: same data order) with a 95% t-interval.
Writes results/adv.json (every run), results/adv.md (table), results/adv.png (clean vs attacked AP).

  python tools/compare_adv.py [--seeds 1 2] [--rows ...] [--parallel 2] [--reuse]
"""
import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from compare import last_evaluation, paired_cell, spread_cell, training_minutes, write_results
from run_demo import REPO, train

ROWS = {  # row -> (config method: configs/Demo/faster_rcnn_R_18_FPN_<method>.yaml, overrides)
    "finetune": ("finetune", ()),
    "adv_train": ("adv_train", ()),
    "udfa": ("udfa", ()),
    "udfa_self": ("udfa_self", ()),
    "udfa_aux_bn": ("udfa", ("MODEL.UDFA.AUX_BN", "True")),
}
# metric suffix -> (test set, column label); "adv": TEST.ADV, "pgd": TEST.PGD (module docstring)
TEST_SETS = {"clean": ("demo_shapes_val", "clean AP"),
             "adv": ("demo_shapes_val_adv", "1-step AP"),
             "pgd": ("demo_shapes_val_pgd", "PGD-10 AP")}
KEYS = [f"AP_{k}" for k in TEST_SETS]
START_SEED = 1


def test_metrics(out_dir):
    """Clean, single-step and PGD bbox AP / AP50 of the run's final evaluation (metrics.json)."""
    names = [name for name, _ in TEST_SETS.values()]
    r = last_evaluation(out_dir, f"{names[-1]}/bbox/AP", f"evaluation on {names}")
    return {f"{m}_{k}": r[f"{name}/bbox/{m}"] for k, (name, _) in TEST_SETS.items() for m in ("AP", "AP50")}


def summarise(runs, rows):
    """Markdown table and paired verdicts; a run without a metric (an older run without the PGD
    evaluation) leaves that cell "-"."""
    control = {r["seed"]: r for r in runs if r["row"] == "finetune"}
    labels = [label for _, label in TEST_SETS.values()]
    header = ["row", "seeds", *labels, *(f"{l} diff to finetune per seed: mean (95% CI)" for l in labels),
              "train min per run"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    verdicts = {}
    for row in ["start", *rows]:
        rs = sorted((r for r in runs if r["row"] == row), key=lambda r: r["seed"])
        if not rs:
            continue
        cells = [spread_cell([r[key] for r in rs]) if all(key in r for r in rs) else "-" for key in KEYS]
        for key in KEYS:
            diffs = [r[key] - control[r["seed"]][key] for r in rs
                     if r["seed"] in control and key in r and key in control[r["seed"]]]
            if row in ("start", "finetune") or not diffs:
                cells.append("-")
                continue
            cell, verdicts.setdefault(row, {})[key] = paired_cell(diffs)
            cells.append(" / ".join(f"{d:+.1f}" for d in diffs) + f": {cell}")
        minutes = [r["train_minutes"] for r in rs if r.get("train_minutes") is not None]
        cells.append(f"{statistics.mean(minutes):.1f}" if minutes else "-")
        lines.append(f"| {row} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), verdicts


def plot(runs, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["start", *rows]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    width = 0.8 / len(KEYS)
    for j, (key, (_, label)) in enumerate(zip(KEYS, TEST_SETS.values())):
        offset = (j - (len(KEYS) - 1) / 2) * width
        means = []
        for i, row in enumerate(names):
            vals = [r[key] for r in runs if r["row"] == row and key in r]
            means.append(statistics.mean(vals) if vals else float("nan"))
            ax.scatter([i + offset] * len(vals), vals, color="k", s=10, zorder=3)
        ax.bar([i + offset for i in range(len(names))], means, width=width, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel("bbox AP on demo_shapes_val")
    ax.legend()
    ax.set_title("UDFA protocol: mean over seeds (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--output-root", default=os.path.join(REPO, "output", "compare_adv"))
    parser.add_argument("--results-dir", default=os.path.join(REPO, "results"))
    parser.add_argument("--reuse", action="store_true", help="keep finished runs found in --output-root")
    args = parser.parse_args()
    os.makedirs(args.results_dir, exist_ok=True)
    start_time = time.time()
    test_sets = ["DATASETS.TEST", "(" + ", ".join(f'"{n}"' for n, _ in TEST_SETS.values()) + ",)"]

    reused = []

    def run(row, method, seed, extra, threads):
        out_dir = os.path.join(args.output_root, f"{row}_seed{seed}")
        if args.reuse and os.path.isfile(os.path.join(out_dir, "model_final.pth")):
            print(f"  reusing {out_dir}", flush=True)
            reused.append(out_dir)
            metrics = test_metrics(out_dir)
        else:
            metrics, _ = train(method, seed, args.output_root, [*test_sets, *extra], threads,
                               metrics=test_metrics, run_name=row)
        return {"row": row, "seed": seed, "train_minutes": training_minutes(out_dir), **metrics}

    # 1. the starting checkpoint (all cores)
    start = run("start", "baseline", START_SEED, (), os.cpu_count() or 1)
    weights = os.path.join(args.output_root, f"start_seed{START_SEED}", "model_final.pth")
    # 2. the fine-tuning rows (the slow UDFA rows first, so the pool's tail is short)
    order = sorted(args.rows, key=lambda r: r == "finetune" or r == "adv_train")
    jobs = [(row, seed) for seed in args.seeds for row in order]
    threads = max(1, (os.cpu_count() or 2) // args.parallel)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = []
        for row, seed in jobs:
            method, extra = ROWS[row]
            extra = ("MODEL.WEIGHTS", weights, "MODEL.UDFA.TEACHER.WEIGHTS", weights, *extra)
            futures.append(pool.submit(run, row, method, seed, extra, threads))
        runs = [start] + [f.result() for f in futures]

    table, verdicts = summarise(runs, args.rows)
    minutes = round((time.time() - start_time) / 60, 1)
    took = (f"assembled from {len(reused)} finished runs of {os.path.relpath(args.output_root, REPO)} (--reuse; each run's "
            f"training minutes in the last column)" if reused else f"`tools/compare_adv.py` took {minutes} min")
    data = {"runs": runs, "verdicts": verdicts, "seeds": args.seeds, "total_minutes": minutes, "reused_runs": len(reused)}
    plot(runs, args.rows, os.path.join(args.results_dir, "adv.png"))
    md = (f"bbox AP on demo_shapes_val, clean and attacked against each model on its total "
          f"detection loss, on 0-255 pixels: 1-step = demo_shapes_val_adv (TEST.ADV: one "
          f"signed-gradient step of 2 within eps 8, the release's robust-mAP attack; the budget "
          f"does not bind), PGD-10 = demo_shapes_val_pgd (TEST.PGD: 10 steps of 2 within eps 8 from "
          f"a random start in +-4). Mean (min-max) over fine-tuning seeds {args.seeds}; every row "
          f"fine-tunes the same start checkpoint (seed {START_SEED}) for 200 iterations; {took}."
          f"\n\n{table}\n")
    write_results(args.results_dir, "adv", data, md)


if __name__ == "__main__":
    main()
