#!/usr/bin/env python
"""`make compare-wsod`: weakly supervised detection on the built-in data (image tags only).

0. pretraining (once): the R-18 body as an image classifier on demo_shapes_objects
   (configs/Demo/wsod_R_18_pretrain.yaml; object-centric images, class labels only: the
   built-in data's ImageNet). Every row starts from it.
Rows (configs/Demo/wsod_R_18_FPN_<row>.yaml), each trained from scratch on demo_shapes_train_weak
with Selective Search proposals, per seed:
  oicr                WSDDN + 3 OICR refinements (the WSOD baseline)
  oicr_reg            + the re-classification + regression branch of SLV, trained on OICR's
                      own top proposals (the control for SLV's pseudo boxes)
  slv_threshold       + SLV, fixed-threshold pseudo boxes
  slv_sd_threshold    + SD (likelihood maps supervise the backbone's attention)
  slv_adaptive        + SLV, adaptive-threshold pseudo boxes
  slv_sd_adaptive     + SD
Metrics of each run's final evaluation (stock train_net.py): VOC07 mAP@0.5 on demo_shapes_val and
CorLoc on the training split (demo_shapes_train_weak, boxes from demo_shapes_train).
Statistics: mean (min-max) over seeds; seed-paired differences (same seed: same data order and
initialisation) to oicr, and between the matched rows of MATCHED (rows that differ in one thing),
per seed and with 95% t-intervals.
Writes results/wsod.json (every run) and results/wsod.md (tables).

  python tools/compare_wsod.py [--seeds 1 2 3 4 5] [--rows ...] [--iters 500] [--parallel 2] [--reuse]
"""
import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from compare import last_evaluation, matched_table, paired_cell, spread_cell, training_minutes, write_results
from run_demo import REPO, train

ROWS = ("oicr", "oicr_reg", "slv_threshold", "slv_sd_threshold", "slv_adaptive", "slv_sd_adaptive")
SD_OF = {"slv_sd_threshold": "slv_threshold", "slv_sd_adaptive": "slv_adaptive"}
# (row, its control, the one thing in which they differ)
MATCHED = (
    ("oicr_reg", "oicr", "a re-classification + regression branch on OICR's own top proposals"),
    ("slv_threshold", "oicr_reg", "the branch's pseudo boxes: SLV's voting maps (fixed threshold) vs OICR's top proposals"),
    ("slv_adaptive", "oicr_reg", "the branch's pseudo boxes: SLV's voting maps (adaptive threshold) vs OICR's top proposals"),
    ("slv_sd_threshold", "slv_threshold", "SD (the maps supervise the backbone's attention)"),
    ("slv_sd_adaptive", "slv_adaptive", "SD (the maps supervise the backbone's attention)"),
)
TEST_SETS = ("demo_shapes_val", "demo_shapes_train_weak")
PROPOSALS = "datasets/proposals/{}_ss_fast.pkl"


def test_metrics(out_dir):
    """mAP50 on the test split and CorLoc on the training split (the run's last evaluation)."""
    r = last_evaluation(out_dir, f"{TEST_SETS[1]}/wsod/CorLoc", f"WSOD evaluation on {TEST_SETS}")
    return {"mAP50": r[f"{TEST_SETS[0]}/wsod/mAP50"], "CorLoc": r[f"{TEST_SETS[1]}/wsod/CorLoc"],
            "mAP50_train": r[f"{TEST_SETS[1]}/wsod/mAP50"], "CorLoc_val": r[f"{TEST_SETS[0]}/wsod/CorLoc"]}


def summarise(runs, rows):
    by = {(r["row"], r["seed"]): r for r in runs}
    lines = ["| row | seeds | mAP50 (val) | CorLoc (train) | mAP50 diff to oicr (95% CI) "
             "| CorLoc diff to oicr (95% CI) | SD effect on mAP50: diff to its SLV row (95% CI) "
             "| train min per run |", "|---|---|---|---|---|---|---|---|"]
    verdicts = {}
    for row in rows:
        rs = sorted((r for r in runs if r["row"] == row), key=lambda r: r["seed"])
        if not rs:
            continue
        cells = [spread_cell([r[k] for r in rs]) for k in ("mAP50", "CorLoc")]
        for key in ("mAP50", "CorLoc"):
            diffs = [r[key] - by[("oicr", r["seed"])][key] for r in rs if ("oicr", r["seed"]) in by]
            if row == "oicr" or not diffs:
                cells.append("-")
                continue
            cell, verdicts.setdefault(row, {})[f"{key}_vs_oicr"] = paired_cell(diffs)
            cells.append(cell)
        base = SD_OF.get(row)
        diffs = [r["mAP50"] - by[(base, r["seed"])]["mAP50"] for r in rs if (base, r["seed"]) in by]
        if base and diffs:
            cell, verdicts.setdefault(row, {})[f"mAP50_vs_{base}"] = paired_cell(diffs)
            cells.append(cell)
        else:
            cells.append("-")
        minutes = [r["train_minutes"] for r in rs if r.get("train_minutes") is not None]
        cells.append(f"{sum(minutes) / len(minutes):.1f}" if minutes else "-")
        lines.append(f"| {row} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines), verdicts


def ensure_proposals():
    """The demo's Selective Search files (cached per image: seconds once computed)."""
    names = [n for n in ("demo_shapes_train", "demo_shapes_val")
             if not os.path.isfile(os.path.join(REPO, PROPOSALS.format(n)))]
    if names:
        subprocess.run([sys.executable, "-W", "ignore", os.path.join(REPO, "tools", "selective_search.py"),
                        "--dataset", *names], cwd=REPO, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--output-root", default=os.path.join(REPO, "output", "compare_wsod"))
    parser.add_argument("--results-dir", default=os.path.join(REPO, "results"))
    parser.add_argument("--reuse", action="store_true", help="keep finished runs found in --output-root")
    args = parser.parse_args()
    os.makedirs(args.results_dir, exist_ok=True)
    start_time = time.time()
    ensure_proposals()
    schedule = ("SOLVER.MAX_ITER", str(args.iters), "SOLVER.STEPS", f"({int(args.iters * 0.8)},)",
                "SOLVER.CHECKPOINT_PERIOD", str(args.iters))
    threads = max(1, (os.cpu_count() or 2) // args.parallel)
    pretrained = os.path.join(args.output_root, "pretrain_seed1", "model_final.pth")
    if not (args.reuse and os.path.isfile(pretrained)):
        train("pretrain", 1, args.output_root, (), os.cpu_count() or 1, family="wsod",
              metrics=lambda out_dir: {})
    schedule = (*schedule, "MODEL.WEIGHTS", pretrained)

    def run(row, seed):
        out_dir = os.path.join(args.output_root, f"{row}_seed{seed}")
        if args.reuse and os.path.isfile(os.path.join(out_dir, "model_final.pth")):
            print(f"  reusing {out_dir}", flush=True)
            metrics = test_metrics(out_dir)
        else:
            metrics, _ = train(row, seed, args.output_root, schedule, threads, family="wsod",
                               metrics=test_metrics, run_name=row)
        return {"row": row, "seed": seed, "train_minutes": training_minutes(out_dir), **metrics}

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = [pool.submit(run, row, seed) for seed in args.seeds for row in args.rows]
        runs = [f.result() for f in futures]

    table, verdicts = summarise(runs, args.rows)
    matched, matched_verdicts = matched_table(runs, MATCHED, (("mAP50", "mAP50"), ("CorLoc", "CorLoc")))
    minutes = (time.time() - start_time) / 60
    data = {"runs": runs, "verdicts": verdicts, "matched": matched_verdicts, "seeds": args.seeds, "iters": args.iters,
            "pretrained": os.path.relpath(pretrained, REPO), "total_minutes": round(minutes, 1)}
    md = (f"Weakly supervised detection on the built-in data (image-level tags of demo_shapes_train, "
          f"Selective Search 'fast' proposals, R-18 FPN whose body is pretrained as a classifier on "
          f"demo_shapes_objects, {args.iters} iterations of 4 images): VOC07 11-point mAP@0.5 on "
          f"demo_shapes_val and CorLoc on the training split, mean (min-max) over seeds {args.seeds}. "
          f"`tools/compare_wsod.py` took {minutes:.1f} min.\n\n{table}\n")
    if matched:
        md += f"\nMatched rows (differing in one thing), seed-paired differences:\n\n{matched}\n"
    write_results(args.results_dir, "wsod", data, md)


if __name__ == "__main__":
    main()
