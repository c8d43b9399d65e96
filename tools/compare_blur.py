#!/usr/bin/env python
"""`make compare-blur`: the blur-robustness protocol on the built-in data, as fine-tuning (the
survey's Table 1 rows, Cho et al. 2022): every row starts from one trained detector.

1. start: the demo baseline (configs/Demo/faster_rcnn_R_18_FPN_baseline.yaml, seed 1, 400
   iterations from scratch on sharp images), trained once; it is also the conventional teacher.
   teacher_sharp: the start fine-tuned on sharp images 8x as long as a row (960 iterations, LR x0.1
   at 480 and at 640): the converged sharp teacher of the matched KD row (its AP at 3/4 and at the
   end is printed; converged means a last-quarter gain below 1.0 AP).
2. rows, each fine-tuning the start checkpoint for 120 iterations with one LR schedule (FINETUNE:
   LR 0.01 after a 20-iteration warm-up, x0.1 from iteration 96), per seed:
     original          sharp images only (the equal-budget control)    faster_rcnn_R_18_FPN_finetune
     blur_augment      each image blurred with probability 0.5           ..._blur_augment
     blur_kd           paired views, frozen teacher = the start, distilled into the whole
                       blurred path                                      ..._blur_kd
     blur_kd_deblur    blur_kd distilled into the deblurring blocks only (blur_skd's target)
     blur_kd_deblur_strong      blur_kd_deblur with teacher_sharp (converged) as the frozen teacher
     blur_skd          paired views, self-guided (the config's design)   ..._blur_skd
   and the self-teacher ablations, each blur_skd with one key changed (SKD_ABLATIONS).
3. evaluation with ``train_net.py --eval-only`` on sharp images and their blurred copies at
   severities 1-5 (a fixed kernel per image, seed 2022; training kernels come from another seed).
   Designs are chosen on one split and reported on another: the self-teacher ablations (and
   blur_skd, for comparison with them) are scored on demo_shapes_select, the main rows on
   demo_shapes_val.

Seeds: 3 for the main rows, 2 for the ablations. Statistics per row: mean and min-max over seeds;
seed-paired differences with a 95% t-interval, to ``original`` in the table and between the
matched rows of MATCHED (rows that differ in one thing). Writes results/blur.json (every run),
results/blur.md (the tables), results/blur.png (AP vs blur severity per row).

  python tools/compare_blur.py [--seeds 1 2 3] [--ablation-seeds 1 2] [--rows ...] [--parallel 2] [--reuse]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from compare import matched_table, paired_cell, spread_cell
from run_demo import REPO, config_file, train

SEVERITIES = (1, 2, 3, 4, 5)
SPLITS = {"val": "demo_shapes_val", "select": "demo_shapes_select"}  # reported / design choice
START_SEED = 1
FINETUNE_ITERS = 120
FINETUNE = ("SOLVER.BASE_LR", 0.01, "SOLVER.WARMUP_ITERS", 20, "SOLVER.STEPS", "(96,)",
            "SOLVER.MAX_ITER", FINETUNE_ITERS, "SOLVER.CHECKPOINT_PERIOD", 60)
# the converged sharp teacher: the start fine-tuned on sharp images for 8x a row's iterations, the LR
# divided by 10 at 1/2 and again at 2/3 of the run, so that its last quarter runs at 1/100 of the LR
TEACHER_SHARP_ITERS = 8 * FINETUNE_ITERS
TEACHER_SHARP = ("SOLVER.MAX_ITER", TEACHER_SHARP_ITERS,
                 "SOLVER.STEPS", f"({TEACHER_SHARP_ITERS // 2}, {TEACHER_SHARP_ITERS * 2 // 3})",
                 "SOLVER.CHECKPOINT_PERIOD", TEACHER_SHARP_ITERS // 4)
CONVERGED_GAIN = 1.0  # converged: sharp AP gains less than this over the last quarter of the run
TEACHER_SHARP_ROWS = ("blur_kd_deblur_strong",)  # rows distilled from it instead of the start
REFERENCE_ROWS = ("start", "teacher_sharp")  # trained once (seed 1): listed, not compared
MAIN_ROWS = {  # row -> (config method: configs/Demo/faster_rcnn_R_18_FPN_<method>.yaml, overrides)
    "original": ("finetune", ()),
    "blur_augment": ("blur_augment", ()),
    "blur_kd": ("blur_kd", ()),
    "blur_kd_deblur": ("blur_kd", ("MODEL.BLUR_SKD.DISTILL_INTO", "deblur")),
    "blur_kd_deblur_strong": ("blur_kd", ("MODEL.BLUR_SKD.DISTILL_INTO", "deblur")),
    "blur_skd": ("blur_skd", ()),  # the config's self-teacher design (SKD_KEYS as in the YAML)
}
# matched rows (row, its control, the one thing in which they differ), compared seed by seed
MATCHED = (
    ("blur_skd", "blur_kd_deblur", "teacher: the configs' self-teacher vs the frozen start (both distil into the deblurring blocks)"),
    ("blur_skd", "blur_kd_deblur_strong", "teacher: the configs' self-teacher vs the converged sharp model (both into the blocks)"),
    ("blur_kd_deblur_strong", "blur_kd_deblur", "frozen teacher: the converged sharp model vs the start"),
    ("blur_kd", "blur_kd_deblur", "distillation target: the whole blurred path vs the deblurring blocks (teacher: the start)"),
    ("blur_kd", "original", "paired blurred views with KD from the start vs sharp images only"),
    ("blur_augment", "original", "blur augmentation vs sharp images only"),
)
# The self-teacher choices (MODEL.BLUR_SKD keys; frozen BN is Detectron2's own key). "skd_base" is
# the reconstruction's first design; each ablation changes one choice of it, the last two.
SKD_BASE = {"MODEL.BLUR_SKD.SELF_TEACHER": "shared", "MODEL.BLUR_SKD.DISTILL_INTO": "all",
            "MODEL.BLUR_SKD.PAIRED_BN": "joint", "MODEL.BLUR_SKD.WARMUP_ITERS": 0,
            "MODEL.RESNETS.NORM": "BN"}
SKD_ABLATIONS = {
    "skd_base": {},
    "skd_ema_teacher": {"MODEL.BLUR_SKD.SELF_TEACHER": "ema"},
    "skd_snapshot_teacher": {"MODEL.BLUR_SKD.SELF_TEACHER": "snapshot"},
    "skd_distill_deblur": {"MODEL.BLUR_SKD.DISTILL_INTO": "deblur"},
    "skd_per_view_bn": {"MODEL.BLUR_SKD.PAIRED_BN": "per_view"},
    "skd_frozen_bn": {"MODEL.RESNETS.NORM": "FrozenBN"},
    "skd_warmup50": {"MODEL.BLUR_SKD.WARMUP_ITERS": 50},
    # two single changes together: distillation into the deblurring blocks and the EMA self-teacher
    "skd_deblur_ema": {"MODEL.BLUR_SKD.DISTILL_INTO": "deblur", "MODEL.BLUR_SKD.SELF_TEACHER": "ema"},
}
ROWS = [*MAIN_ROWS, *SKD_ABLATIONS]


def skd_settings(row):
    """The self-teacher choices of a self-guided row: the ablation's, or the blur_skd YAML's."""
    if row in SKD_ABLATIONS:
        return {**SKD_BASE, **SKD_ABLATIONS[row]}
    import lgd_detectron2  # noqa: F401

    cfg = lgd_detectron2.get_distill_cfg()
    cfg.merge_from_file(os.path.join(REPO, config_file("blur_skd")))
    return {key: cfg[key.split(".")[0]][key.split(".")[1]][key.split(".")[2]] for key in SKD_BASE}


def row_runs(rows):
    """row -> (config method, overrides, the row whose runs it shares): a self-guided row whose
    choices equal another's is the same experiment, run once."""
    plan, seen = {}, {}
    for row in sorted(rows, key=lambda r: r == "blur_skd"):  # the ablations own their runs
        if row in SKD_ABLATIONS or row == "blur_skd":
            settings = skd_settings(row)
            key = tuple(sorted(settings.items()))
            overrides = tuple(v for item in settings.items() for v in item)
            plan[row] = ("blur_skd", overrides, seen.setdefault(key, row))
        else:
            plan[row] = (*MAIN_ROWS[row], row)
    return {row: plan[row] for row in rows}


def test_sets(split):
    """The sharp set of ``split`` and its blurred copies at severities 1-5."""
    return [SPLITS[split]] + [f"{SPLITS[split]}_blur{s}" for s in SEVERITIES]


def evaluate(config, weights, out_dir, extra=(), threads=1, reuse=False, split="val"):
    """``train_net.py --eval-only`` of ``weights`` on the sharp and blurred sets of ``split``; AP
    and AP50 per set (read from the "Evaluation results for <name>" tables it prints), keys
    prefixed with "select_" for the select split."""
    log_file = os.path.join(out_dir, "eval.log" if split == "val" else f"eval_{split}.log")
    if reuse and os.path.isfile(log_file):  # evaluated before: read its tables
        with open(log_file) as f:
            return parse_eval_log(f.read(), log_file, split)
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", config,
           "--eval-only", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", os.path.join(out_dir, split),
           "DATASETS.TEST", "(" + ", ".join(f'"{n}"' for n in test_sets(split)) + ",)", *map(str, extra)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    os.makedirs(out_dir, exist_ok=True)
    with open(log_file, "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"evaluation of {weights} failed; see {log_file}")
    return parse_eval_log(proc.stdout + proc.stderr, log_file, split)


def parse_eval_log(log, log_file, split="val"):
    # per dataset: "Evaluation results for NAME in csv format:" ... "copypaste: 36.7,59.7,..."
    tables = re.findall(r"Evaluation results for (\S+) in csv format:.*?copypaste: ([0-9.,nan]+)\n", log, re.S)
    values = {name: [float(v) for v in row.split(",")] for name, row in tables}
    names = test_sets(split)
    missing = [n for n in names if n not in values]
    if missing:
        raise SystemExit(f"no AP for {missing} in {log_file}")
    prefix = "" if split == "val" else f"{split}_"
    result = {}
    for name in names:
        tag = "sharp" if name == SPLITS[split] else "blur" + name[-1]
        result[f"{prefix}AP_{tag}"], result[f"{prefix}AP50_{tag}"] = values[name][:2]
    for metric in ("AP", "AP50"):
        result[f"{prefix}{metric}_blur_mean"] = statistics.mean(result[f"{prefix}{metric}_blur{s}"] for s in SEVERITIES)
    return result


def training_minutes(out_dir):
    """Detectron2's "Total training time" of the run (the last one logged in log.txt)."""
    with open(os.path.join(out_dir, "log.txt")) as f:
        times = re.findall(r"Total training time: (\d+):(\d+):(\d+)", f.read())
    h, m, s = map(int, times[-1])
    return h * 60 + m + s / 60


def row_means(runs, row, key):
    vals = [r[key] for r in runs if r["row"] == row and key in r]
    return statistics.mean(vals) if vals else None


def summarise(runs, rows, split="val", control_row="original"):
    """The table of ``rows`` on ``split`` (the runs evaluated there): AP per severity, mean
    (min-max) over seeds, and the seed-paired differences to ``control_row``."""
    prefix = "" if split == "val" else f"{split}_"
    cols = [f"{prefix}AP_sharp"] + [f"{prefix}AP_blur{s}" for s in SEVERITIES] + [f"{prefix}AP_blur_mean"]
    head = ["sharp AP"] + [f"blur s{s}" for s in SEVERITIES] + ["blur mean AP"]
    lines = ["| row | seeds | " + " | ".join(head) + f" | sharp diff to {control_row} (95% CI) "
             f"| blur-mean diff to {control_row} (95% CI) | train min |", "|---" * (len(cols) + 5) + "|"]
    control = {r["seed"]: r for r in runs if r["row"] == control_row and cols[0] in r}
    control_runs = {r.get("same_runs_as", control_row) for r in control.values()}
    for row in rows:
        rs = [r for r in runs if r["row"] == row and cols[0] in r]
        if not rs:
            continue
        cells = [spread_cell([r[c] for r in rs]) for c in cols]
        same = row != control_row and {r.get("same_runs_as", row) for r in rs} == control_runs
        for c in (cols[0], cols[-1]):
            diffs = [r[c] - control[r["seed"]][c] for r in rs if r["seed"] in control]
            cells.append(f"same runs as {control_row}" if same else
                         "-" if row in (control_row, *REFERENCE_ROWS) or not diffs else paired_cell(diffs)[0])
        minutes = [r["train_minutes"] for r in rs if r.get("train_minutes") is not None]
        cells.append(f"{statistics.mean(minutes):.1f}" if minutes else "-")
        lines.append(f"| {row} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matched_comparisons(runs):
    """Seed-paired differences (blurred mean AP and sharp AP on val) between the rows of MATCHED
    that were both run: (table, verdicts)."""
    return matched_table(runs, MATCHED, (("AP_blur_mean", "blur-mean AP"), ("AP_sharp", "sharp AP")))


def design_choice(runs, rows, seeds=None):
    """The self-guided design with the best mean blurred AP on the select split among ``rows``
    (blur_skd and the ablations evaluated there), and blur_skd's own: (best row, its AP, blur_skd's AP),
    each the mean over ``seeds`` (default: every seed run), so that rows compare on the same seeds."""
    runs = [r for r in runs if seeds is None or r["seed"] in seeds]
    scored = {row: row_means(runs, row, "select_AP_blur_mean") for row in rows}
    scored = {row: ap for row, ap in scored.items() if ap is not None}
    if not scored:
        return None
    best = max(scored, key=lambda row: (scored[row], row != "blur_skd"))  # a tie names the ablation
    return best, scored[best], scored.get("blur_skd")


def plot(runs, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [0, *SEVERITIES]
    for row in rows:
        ys = [row_means(runs, row, "AP_sharp")] + [row_means(runs, row, f"AP_blur{s}") for s in SEVERITIES]
        if ys[0] is None:
            continue
        main = row in ("start", "original", "blur_augment", "blur_kd", "blur_skd")
        ax.plot(xs, ys, marker="o" if main else ".", lw=2 if main else 0.8,
                ls="-" if main else "--", label=row)
    ax.set_xticks(xs)
    ax.set_xticklabels(["sharp"] + [f"s{s}" for s in SEVERITIES])
    ax.set_xlabel("motion-blur severity of the test images")
    ax.set_ylabel("bbox AP on demo_shapes_val, mean over seeds")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--ablation-seeds", nargs="+", type=int, default=[1, 2],
                        help="seeds of the skd_* ablation rows (the four main rows use --seeds)")
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--output-root", default=os.path.join(REPO, "output", "compare_blur"))
    parser.add_argument("--results-dir", default=os.path.join(REPO, "results"))
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs (and evaluations) found in --output-root")
    args = parser.parse_args()
    os.makedirs(args.results_dir, exist_ok=True)
    start_time = time.time()
    start_dir = os.path.join(args.output_root, f"start_seed{START_SEED}")
    weights = os.path.join(start_dir, "model_final.pth")
    teacher = ("MODEL.BLUR_SKD.FROZEN_TEACHER.WEIGHTS", weights)

    def run(row, method, seed, overrides, threads, splits=("val",), start_weights=None):
        """Fine-tune (or, for "start", train) one row and evaluate it on ``splits``;
        ``overrides``: the row's config changes (also applied when it is evaluated)."""
        out_dir = os.path.join(args.output_root, f"{row}_seed{seed}")
        model = os.path.join(out_dir, "model_final.pth")
        if args.reuse and os.path.isfile(model):
            print(f"  reusing {model}", flush=True)
        else:  # train only (no evaluation in the training run), then evaluate on every test set
            schedule = () if row == "start" else ("MODEL.WEIGHTS", start_weights or weights, *FINETUNE)
            train(method, seed, args.output_root,
                  ["DATASETS.TEST", "()", *map(str, (*teacher, *schedule, *overrides))], threads,
                  metrics=lambda _: {}, run_name=row)
        metrics = {}
        for split in splits:
            metrics.update(evaluate(config_file(method), model, os.path.join(out_dir, "eval"),
                                    (*teacher, *overrides), threads, reuse=args.reuse, split=split))
        return {"row": row, "seed": seed, "train_minutes": round(training_minutes(out_dir), 2), **metrics}

    start = run("start", "baseline", START_SEED, (), os.cpu_count() or 1)
    threads = max(1, (os.cpu_count() or 2) // args.parallel)
    plan = row_runs(args.rows)
    references = [start]
    sharp_teacher = ()
    if any(row in TEACHER_SHARP_ROWS for row in plan):
        sharp = run("teacher_sharp", "finetune", START_SEED, TEACHER_SHARP, os.cpu_count() or 1)
        # how far from converged: sharp AP at 3/4 of its schedule (its checkpoint there) and at the end
        three_quarters = os.path.join(args.output_root, f"teacher_sharp_seed{START_SEED}",
                                      f"model_{3 * TEACHER_SHARP_ITERS // 4 - 1:07d}.pth")
        at_3q = evaluate(config_file("finetune"), three_quarters,
                         os.path.join(args.output_root, f"teacher_sharp_seed{START_SEED}", "eval_3q"),
                         teacher, os.cpu_count() or 1, reuse=args.reuse)
        references.append({**sharp, "AP_sharp_at_3_quarters": at_3q["AP_sharp"]})
        sharp_teacher = ("MODEL.BLUR_SKD.FROZEN_TEACHER.WEIGHTS",
                         os.path.join(args.output_root, f"teacher_sharp_seed{START_SEED}", "model_final.pth"))

    def splits_of(owner):
        """Where an experiment is evaluated: the ablations on select (where designs are
        chosen), blur_skd on both (compared with them there), the other main rows on val."""
        rows = [row for row, (_, _, o) in plan.items() if o == owner]
        return tuple(split for split in SPLITS
                     if any((split == "select") == (row in SKD_ABLATIONS) or row == "blur_skd" for row in rows))

    # each experiment once, per seed the slow paired-view rows first (a short tail for the pool)
    # main rows: the seeds the survey's ordering is read from; ablations: fewer
    seeds_of = {row: args.seeds if row in MAIN_ROWS else args.ablation_seeds for row in plan}
    wanted = sorted({(owner, seed) for row, (_, _, owner) in plan.items() for seed in seeds_of[row]},
                    key=lambda job: (job[1], job[0] in ("original", "blur_augment")))
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {(owner, seed): pool.submit(
            run, owner, plan[owner][0], seed,
            (*plan[owner][1], *(sharp_teacher if owner in TEACHER_SHARP_ROWS else ())), threads, splits_of(owner))
            for owner, seed in wanted}
        runs = references + [{**futures[(owner, seed)].result(), "row": row, "same_runs_as": owner}
                             for row, (_, _, owner) in plan.items() for seed in seeds_of[row]]

    main_rows = [*REFERENCE_ROWS, *(r for r in args.rows if r in MAIN_ROWS)]
    ablation_rows = [r for r in args.rows if r in SKD_ABLATIONS or r == "blur_skd"]
    table = summarise(runs, main_rows)
    matched, verdicts = matched_comparisons(runs)
    select_table = summarise(runs, ablation_rows, split="select", control_row="blur_skd")
    choice = design_choice(runs, ablation_rows, args.ablation_seeds)
    minutes = (time.time() - start_time) / 60
    with open(os.path.join(args.results_dir, "blur.json"), "w") as f:
        json.dump({"runs": runs, "seeds": args.seeds, "ablation_seeds": args.ablation_seeds,
                   "matched": verdicts, "design_choice": choice, "total_minutes": round(minutes, 1)}, f, indent=1)
    plot(runs, main_rows, os.path.join(args.results_dir, "blur.png"))
    md = (f"bbox AP on demo_shapes_val (sharp) and its blurred copies (severity 1-5), mean (min-max) "
          f"over fine-tuning seeds {args.seeds}; every row fine-tunes the start checkpoint (seed "
          f"{START_SEED}, also the frozen teacher of blur_kd and blur_kd_deblur) for {FINETUNE_ITERS} "
          f"iterations. `tools/compare_blur.py` took {minutes:.1f} min"
          f"{' (finished runs and evaluations reused, not redone)' if args.reuse else ''}.\n\n{table}\n")
    sharp = next((r for r in references if r["row"] == "teacher_sharp"), None)
    if sharp:
        gain = sharp["AP_sharp"] - sharp["AP_sharp_at_3_quarters"]
        md += (f"\nteacher_sharp (blur_kd_deblur_strong's teacher): sharp AP {sharp['AP_sharp_at_3_quarters']:.1f} "
               f"after {3 * TEACHER_SHARP_ITERS // 4} iterations, {sharp['AP_sharp']:.1f} after {TEACHER_SHARP_ITERS}: "
               f"last-quarter gain {gain:+.1f}, {'converged' if gain < CONVERGED_GAIN else 'not converged'} "
               f"(converged: a gain below {CONVERGED_GAIN:.1f}).\n")
    if matched:
        md += f"\nMatched rows (differing in one thing), seed-paired differences on demo_shapes_val:\n\n{matched}\n"
    if choice:
        best, best_ap, own = choice
        md += (f"\nThe self-teacher design, chosen on demo_shapes_select (sharp and blurred copies; "
               f"seeds {args.ablation_seeds} for the ablations, {args.seeds} for blur_skd; a row whose "
               f"choices equal another's shares its runs):\n\n{select_table}\n\n"
               f"Best mean blurred AP on select over seeds {args.ablation_seeds}: {best} ({best_ap:.1f})"
               + (f"; blur_skd (the configs' design, the runs of {plan['blur_skd'][2]}): {own:.1f}.\n"
                  if own is not None else ".\n"))
    with open(os.path.join(args.results_dir, "blur.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
