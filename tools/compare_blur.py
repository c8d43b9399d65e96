#!/usr/bin/env python
"""`make compare-blur`: the blur-robustness protocol on the built-in data, as fine-tuning (the
survey's Table 1 rows, Cho et al. 2022): every row starts from one trained detector.

1. start: the demo baseline (configs/Demo/faster_rcnn_R_18_FPN_baseline.yaml, seed 1, 400
   iterations from scratch on sharp images), trained once; it is also the conventional teacher.
2. rows, each fine-tuning the start checkpoint for 120 iterations with one LR schedule (FINETUNE:
   LR 0.01 after a 20-iteration warm-up, x0.1 from iteration 96), per seed:
     original        sharp images only (the equal-budget control)   faster_rcnn_R_18_FPN_finetune
     blur_augment    each image blurred with probability 0.5          ..._blur_augment
     blur_kd         paired views, frozen teacher = the start          ..._blur_kd
     blur_skd        paired views, self-guided (the config's design)  ..._blur_skd
   and the self-teacher ablations, each blur_skd with one key changed (SKD_ABLATIONS).
3. every model is evaluated with ``train_net.py --eval-only`` on demo_shapes_val (sharp) and its
   blurred copies at severities 1-5 (demo_shapes_val_blur<N>: a fixed kernel per image, seed
   2022; training kernels come from another seed).

Seeds: 3 for the four main rows (the differences between them are smaller than the spread of 2
seeds), 2 for the ablations. Statistics per row: mean and min-max over seeds; the seed-paired difference to ``original`` with
a 95% t-interval. Writes results/blur.json (every run), results/blur.md (table and the survey's
ordering checks), results/blur.png (AP vs blur severity per row).

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

from compare import paired_cell, spread_cell
from run_demo import REPO, config_file, train

SEVERITIES = (1, 2, 3, 4, 5)
TEST_SETS = ["demo_shapes_val"] + [f"demo_shapes_val_blur{s}" for s in SEVERITIES]
START_SEED = 1
FINETUNE_ITERS = 120
FINETUNE = ("SOLVER.BASE_LR", 0.01, "SOLVER.WARMUP_ITERS", 20, "SOLVER.STEPS", "(96,)",
            "SOLVER.MAX_ITER", FINETUNE_ITERS, "SOLVER.CHECKPOINT_PERIOD", 60)
MAIN_ROWS = {  # row -> (config method: configs/Demo/faster_rcnn_R_18_FPN_<method>.yaml, overrides)
    "original": ("finetune", ()),
    "blur_augment": ("blur_augment", ()),
    "blur_kd": ("blur_kd", ()),
    "blur_skd": ("blur_skd", ()),  # the config's self-teacher design (SKD_KEYS as in the YAML)
}
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
    # the two best single changes of the first measurement, together
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


def evaluate(config, weights, out_dir, extra=(), threads=1, reuse=False):
    """``train_net.py --eval-only`` of ``weights`` on every test set; AP and AP50 per test set
    (read from the "Evaluation results for <name>" tables it prints)."""
    log_file = os.path.join(out_dir, "eval.log")
    if reuse and os.path.isfile(log_file):  # evaluated before: read its tables
        with open(log_file) as f:
            return parse_eval_log(f.read(), log_file)
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", config,
           "--eval-only", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", out_dir,
           "DATASETS.TEST", "(" + ", ".join(f'"{n}"' for n in TEST_SETS) + ",)", *map(str, extra)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    os.makedirs(out_dir, exist_ok=True)
    with open(log_file, "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"evaluation of {weights} failed; see {log_file}")
    return parse_eval_log(proc.stdout + proc.stderr, log_file)


def parse_eval_log(log, log_file):
    # per dataset: "Evaluation results for NAME in csv format:" ... "copypaste: 36.7,59.7,..."
    tables = re.findall(r"Evaluation results for (\S+) in csv format:.*?copypaste: ([0-9.,nan]+)\n", log, re.S)
    values = {name: [float(v) for v in row.split(",")] for name, row in tables}
    missing = [n for n in TEST_SETS if n not in values]
    if missing:
        raise SystemExit(f"no AP for {missing} in {log_file}")
    result = {}
    for name in TEST_SETS:
        tag = "sharp" if name == "demo_shapes_val" else "blur" + name[-1]
        result[f"AP_{tag}"], result[f"AP50_{tag}"] = values[name][:2]
    for metric in ("AP", "AP50"):
        result[f"{metric}_blur_mean"] = statistics.mean(result[f"{metric}_blur{s}"] for s in SEVERITIES)
    return result


def training_minutes(out_dir):
    """Detectron2's "Total training time" of the run (the last one logged in log.txt)."""
    with open(os.path.join(out_dir, "log.txt")) as f:
        times = re.findall(r"Total training time: (\d+):(\d+):(\d+)", f.read())
    h, m, s = map(int, times[-1])
    return h * 60 + m + s / 60


def row_means(runs, row, key):
    vals = [r[key] for r in runs if r["row"] == row]
    return statistics.mean(vals) if vals else None


def summarise(runs, rows):
    cols = ["AP_sharp"] + [f"AP_blur{s}" for s in SEVERITIES] + ["AP_blur_mean"]
    head = ["sharp AP"] + [f"blur s{s}" for s in SEVERITIES] + ["blur mean AP"]
    lines = ["| row | seeds | " + " | ".join(head) + " | sharp diff to original (95% CI) "
             "| blur-mean diff to original (95% CI) | train min |", "|---" * (len(cols) + 5) + "|"]
    control = {r["seed"]: r for r in runs if r["row"] == "original"}
    for row in ["start", *rows]:
        rs = [r for r in runs if r["row"] == row]
        if not rs:
            continue
        cells = [spread_cell([r[c] for r in rs]) for c in cols]
        for c in ("AP_sharp", "AP_blur_mean"):
            diffs = [r[c] - control[r["seed"]][c] for r in rs if r["seed"] in control]
            cells.append("-" if row in ("start", "original") or not diffs else paired_cell(diffs)[0])
        minutes = [r["train_minutes"] for r in rs if r.get("train_minutes") is not None]
        cells.append(f"{statistics.mean(minutes):.1f}" if minutes else "-")
        lines.append(f"| {row} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ordering_checks(runs):
    """The survey's ordering on mean blurred AP and the sharp-AP condition, from row means."""
    m = {row: (row_means(runs, row, "AP_blur_mean"), row_means(runs, row, "AP_sharp"))
         for row in ("original", "blur_kd", "blur_skd")}
    if any(v[0] is None for v in m.values()):
        return []
    (o_blur, o_sharp), (k_blur, _), (s_blur, s_sharp) = m["original"], m["blur_kd"], m["blur_skd"]
    return [
        f"self-guided >= conventional KD on mean blurred AP: {s_blur:.1f} vs {k_blur:.1f}: "
        f"{'met' if s_blur >= k_blur else 'missed'}",
        f"conventional KD >= original on mean blurred AP: {k_blur:.1f} vs {o_blur:.1f}: "
        f"{'met' if k_blur >= o_blur else 'missed'}",
        f"self-guided sharp AP >= original's - 1.0: {s_sharp:.1f} vs {o_sharp - 1:.1f}: "
        f"{'met' if s_sharp >= o_sharp - 1 else 'missed'}",
    ]


def plot(runs, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [0, *SEVERITIES]
    for row in ["start", *rows]:
        ys = [row_means(runs, row, "AP_sharp")] + [row_means(runs, row, f"AP_blur{s}") for s in SEVERITIES]
        if ys[0] is None:
            continue
        main = row in MAIN_ROWS or row == "start"
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

    def run(row, method, seed, overrides, threads):
        """Fine-tune (or, for "start", train) one row and evaluate it; ``overrides``: the row's
        config changes (also applied when it is evaluated)."""
        out_dir = os.path.join(args.output_root, f"{row}_seed{seed}")
        model = os.path.join(out_dir, "model_final.pth")
        if args.reuse and os.path.isfile(model):
            print(f"  reusing {model}", flush=True)
        else:  # train only (no evaluation in the training run), then evaluate on every test set
            schedule = () if row == "start" else ("MODEL.WEIGHTS", weights, *FINETUNE)
            train(method, seed, args.output_root,
                  ["DATASETS.TEST", "()", *map(str, (*teacher, *schedule, *overrides))], threads,
                  metrics=lambda _: {}, run_name=row)
        metrics = evaluate(config_file(method), model, os.path.join(out_dir, "eval"),
                           (*teacher, *overrides), threads, reuse=args.reuse)
        return {"row": row, "seed": seed, "train_minutes": round(training_minutes(out_dir), 2), **metrics}

    start = run("start", "baseline", START_SEED, (), os.cpu_count() or 1)
    threads = max(1, (os.cpu_count() or 2) // args.parallel)
    plan = row_runs(args.rows)
    # each experiment once, per seed the slow paired-view rows first (a short tail for the pool)
    # main rows: the seeds the survey's ordering is read from; ablations: fewer
    seeds_of = {row: args.seeds if row in MAIN_ROWS else args.ablation_seeds for row in plan}
    wanted = sorted({(owner, seed) for row, (_, _, owner) in plan.items() for seed in seeds_of[row]},
                    key=lambda job: (job[1], job[0] in ("original", "blur_augment")))
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {(owner, seed): pool.submit(run, owner, plan[owner][0], seed, plan[owner][1], threads)
                   for owner, seed in wanted}
        runs = [start] + [{**futures[(owner, seed)].result(), "row": row, "same_runs_as": owner}
                          for row, (_, _, owner) in plan.items() for seed in seeds_of[row]]

    table = summarise(runs, args.rows)
    checks = ordering_checks(runs)
    minutes = (time.time() - start_time) / 60
    with open(os.path.join(args.results_dir, "blur.json"), "w") as f:
        json.dump({"runs": runs, "seeds": args.seeds, "ablation_seeds": args.ablation_seeds, "checks": checks,
                   "total_minutes": round(minutes, 1)}, f, indent=1)
    plot(runs, args.rows, os.path.join(args.results_dir, "blur.png"))
    md = (f"bbox AP on demo_shapes_val (sharp) and its blurred copies (severity 1-5), mean (min-max) "
          f"over fine-tuning seeds {args.seeds} (the skd_* ablations: {args.ablation_seeds}; a row "
          f"whose choices equal an ablation's shares its runs); every row fine-tunes the start checkpoint (seed "
          f"{START_SEED}, also blur_kd's teacher) for {FINETUNE_ITERS} iterations. `tools/compare_blur.py` took "
          f"{minutes:.1f} min.\n\n{table}\n\n" + "".join(f"* {c}\n" for c in checks))
    with open(os.path.join(args.results_dir, "blur.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
