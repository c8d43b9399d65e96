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
3. each run's final evaluation (train_net.py) on demo_shapes_val (clean) and demo_shapes_val_adv
   (one signed-gradient step against the model under test: eps 8, step 2, on 0-255 pixels).

Statistics per row: mean and min-max over seeds of clean and attacked AP; the seed-paired
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
TEST_SETS = ("demo_shapes_val", "demo_shapes_val_adv")
START_SEED = 1


def test_metrics(out_dir):
    """Clean and attacked bbox AP / AP50 of the run's final evaluation (metrics.json)."""
    r = last_evaluation(out_dir, f"{TEST_SETS[1]}/bbox/AP", f"evaluation on {TEST_SETS}")
    return {"AP_clean": r[f"{TEST_SETS[0]}/bbox/AP"], "AP50_clean": r[f"{TEST_SETS[0]}/bbox/AP50"],
            "AP_adv": r[f"{TEST_SETS[1]}/bbox/AP"], "AP50_adv": r[f"{TEST_SETS[1]}/bbox/AP50"]}


def summarise(runs, rows):
    control = {r["seed"]: r for r in runs if r["row"] == "finetune"}
    lines = ["| row | seeds | clean AP | attacked AP | clean AP diff to finetune (95% CI) "
             "| attacked AP diff to finetune (95% CI) | train min per run |",
             "|---|---|---|---|---|---|---|"]
    verdicts = {}
    for row in ["start", *rows]:
        rs = sorted((r for r in runs if r["row"] == row), key=lambda r: r["seed"])
        if not rs:
            continue
        cells = [spread_cell([r[key] for r in rs]) for key in ("AP_clean", "AP_adv")]
        for key in ("AP_clean", "AP_adv"):
            diffs = [r[key] - control[r["seed"]][key] for r in rs if r["seed"] in control]
            if row in ("start", "finetune") or not diffs:
                cells.append("-")
                continue
            cell, verdicts.setdefault(row, {})[key] = paired_cell(diffs)
            cells.append(cell)
        minutes = [r["train_minutes"] for r in rs if r.get("train_minutes") is not None]
        cells.append(f"{statistics.mean(minutes):.1f}" if minutes else "-")
        lines.append(f"| {row} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), verdicts


def plot(runs, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["start", *rows]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 4))
    for offset, key, label in ((-0.17, "AP_clean", "clean"), (0.17, "AP_adv", "attacked (1 step)")):
        means = []
        for i, row in enumerate(names):
            vals = [r[key] for r in runs if r["row"] == row]
            means.append(statistics.mean(vals) if vals else float("nan"))
            ax.scatter([i + offset] * len(vals), vals, color="k", s=10, zorder=3)
        ax.bar([i + offset for i in range(len(names))], means, width=0.34, label=label)
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
    test_sets = ["DATASETS.TEST", "(" + ", ".join(f'"{n}"' for n in TEST_SETS) + ",)"]

    def run(row, method, seed, extra, threads):
        out_dir = os.path.join(args.output_root, f"{row}_seed{seed}")
        if args.reuse and os.path.isfile(os.path.join(out_dir, "model_final.pth")):
            print(f"  reusing {out_dir}", flush=True)
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
    minutes = (time.time() - start_time) / 60
    data = {"runs": runs, "verdicts": verdicts, "seeds": args.seeds, "total_minutes": round(minutes, 1)}
    plot(runs, args.rows, os.path.join(args.results_dir, "adv.png"))
    md = (f"bbox AP on demo_shapes_val, clean and attacked (demo_shapes_val_adv: one signed-gradient "
          f"step of 2 on 0-255 pixels, eps 8, against each model), mean (min-max) over fine-tuning "
          f"seeds {args.seeds}; every row fine-tunes the same start checkpoint (seed {START_SEED}) for "
          f"200 iterations. `tools/compare_adv.py` took {minutes:.1f} min.\n\n{table}\n")
    write_results(args.results_dir, "adv", data, md)


if __name__ == "__main__":
    main()
