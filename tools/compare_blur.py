#!/usr/bin/env python
"""The blur-robustness comparison on the built-in data (the survey's Table 1 rows as a protocol).

Rows, all with the demo Faster R-CNN R-18 recipe and seed:
  original      trained on sharp images only            (faster_rcnn_R_18_FPN_baseline.yaml)
  blur_augment  + each image blurred with probability 0.5 (faster_rcnn_R_18_FPN_blur_augment.yaml)
  blur_kd       paired views, frozen teacher = the "original" model of seed 1, same losses as
                blur_skd (conventional distillation)      (faster_rcnn_R_18_FPN_blur_kd.yaml)
  blur_skd      paired views, the sharp view of the same network teaches (self-guided)
                                                          (faster_rcnn_R_18_FPN_blur_skd.yaml)
Each model is trained (no evaluation during training), then evaluated with
``train_net.py --eval-only`` on demo_shapes_val (sharp) and on its blurred copies at severities 1-5
(``demo_shapes_val_blur<N>``: a fixed kernel per image, seed 2022; training kernels come from a
different seed). Writes results/blur.json (every run) and results/blur.md (mean and min-max).

  python tools/compare_blur.py [--seeds 1 2] [--parallel 2] [--reuse]
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

from run_demo import REPO, config_file, train

ROWS = ("original", "blur_augment", "blur_kd", "blur_skd")
CONFIG_OF = {"original": "baseline"}  # run_demo's method name -> configs/Demo/faster_rcnn_R_18_FPN_<m>.yaml
SEVERITIES = (1, 2, 3, 4, 5)
TEST_SETS = ["demo_shapes_val"] + [f"demo_shapes_val_blur{s}" for s in SEVERITIES]


def evaluate(config, weights, out_dir, extra=(), threads=1, reuse=False):
    """``train_net.py --eval-only`` of ``weights`` on every test set; AP and AP50 per test set
    (read from the "Evaluation results for <name>" tables it prints)."""
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", config,
           "--eval-only", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", out_dir,
           "DATASETS.TEST", "(" + ", ".join(f'"{n}"' for n in TEST_SETS) + ",)", *extra]
    log_file = os.path.join(out_dir, "eval.log")
    if reuse and os.path.isfile(log_file):  # evaluated before: read its tables
        with open(log_file) as f:
            return parse_eval_log(f.read(), log_file)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    log = proc.stdout + proc.stderr
    os.makedirs(out_dir, exist_ok=True)
    with open(log_file, "w") as f:
        f.write(log)
    if proc.returncode != 0:
        raise SystemExit(f"evaluation of {weights} failed; see {log_file}")
    return parse_eval_log(log, log_file)


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


def summarise(runs):
    cols = (["AP_sharp"] + [f"AP_blur{s}" for s in SEVERITIES]
            + ["AP_blur_mean", "AP50_sharp", "AP50_blur_mean", "train_minutes"])
    head = (["sharp AP"] + [f"blur s{s} AP" for s in SEVERITIES]
            + ["blur mean AP", "sharp AP50", "blur mean AP50", "train min"])
    lines = ["| row | seeds | " + " | ".join(head) + " |", "|---" * (len(cols) + 2) + "|"]
    for row in ROWS:
        rs = [r for r in runs if r["row"] == row]
        if not rs:
            continue
        cells = []
        for c in cols:
            vals = [r[c] for r in rs]
            spread = f" ({min(vals):.1f}-{max(vals):.1f})" if len(vals) > 1 else ""
            cells.append(f"{statistics.mean(vals):.1f}{spread}")
        lines.append(f"| {row} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--output-root", default=os.path.join(REPO, "output", "compare_blur"))
    parser.add_argument("--results-dir", default=os.path.join(REPO, "results"))
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs found in --output-root (and their evaluation, if done) "
                             "instead of retraining them")
    args = parser.parse_args()
    os.makedirs(args.results_dir, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // args.parallel)
    teacher_seed = args.seeds[0]
    teacher_weights = os.path.join(args.output_root, f"baseline_seed{teacher_seed}", "model_final.pth")
    start = time.time()

    def run(row, seed):
        method = CONFIG_OF.get(row, row)
        out_dir = os.path.join(args.output_root, f"{method}_seed{seed}")
        weights = os.path.join(out_dir, "model_final.pth")
        extra = []
        if row == "blur_kd":
            teacher_run.result()  # the frozen teacher is the "original" model of the first seed
            extra += ["MODEL.BLUR_SKD.FROZEN_TEACHER.WEIGHTS", teacher_weights]
        if args.reuse and os.path.isfile(weights):
            print(f"  reusing {weights}", flush=True)
        else:  # train only (no evaluation in the training run), then evaluate on every test set
            train(method, seed, args.output_root, ["DATASETS.TEST", "()", *extra], threads,
                  metrics=lambda _: {})
        metrics = evaluate(config_file(method), weights, os.path.join(out_dir, "eval"), extra, threads,
                           reuse=args.reuse)
        return metrics, training_minutes(out_dir)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        rows = list(args.rows)
        if "blur_kd" in rows and "original" not in rows:
            rows.insert(0, "original")  # needed as the teacher
        jobs = [(r, s) for s in args.seeds for r in rows]
        teacher_job = ("original", teacher_seed)
        teacher_run = pool.submit(run, *teacher_job) if teacher_job in jobs else None
        futures = {job: (teacher_run if job == teacher_job else pool.submit(run, *job)) for job in jobs}
        results = {job: f.result() for job, f in futures.items()}

    runs = [{"row": r, "seed": s, "train_minutes": round(t, 2), **res} for (r, s), (res, t) in results.items()]
    path = os.path.join(args.results_dir, "blur.json")
    with open(path, "w") as f:
        json.dump({"runs": runs, "total_minutes": round((time.time() - start) / 60, 1)}, f, indent=1)
    md = (f"bbox AP (train_net.py --eval-only) on demo_shapes_val (sharp) and its blurred copies (severity 1-5), mean (min-max) "
          f"over seeds {args.seeds}; blur_kd's teacher: the original model of seed {teacher_seed}. "
          f"`tools/compare_blur.py` took {(time.time() - start) / 60:.1f} min.\n\n{summarise(runs)}\n")
    with open(os.path.join(args.results_dir, "blur.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
