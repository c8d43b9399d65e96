#!/usr/bin/env python
"""`make compare*`: LGD's comparison protocols on the built-in data.

Every row trains the demo student (R-18-FPN, configs/Demo/) with one recipe per protocol on
demo_shapes_train and evaluates it on demo_shapes_val every EVAL_PERIOD iterations, for several
seeds; a seed fixes the initialisation and the data order, so rows of one seed are paired.

Protocols:
  pretrained_long  LGD's regime (make compare, compare-quick, compare-ablations; the default): the
              R-18 body starts from its classification pretraining on demo_shapes_objects (the
              built-in data's stand-in for ImageNet; trained once, first, and shared by both
              pretrained protocols), Detectron2's usual treatment of a pretrained body (FrozenBN,
              FREEZE_AT 2), the original's gradient clipping (each element at 1.0) in every row,
              LR 0.01, 800 iterations with the LR x0.1 at 533 and 711 (the fractions of LGD's
              released 2x schedule), LGD's distillation schedule scaled to the run.
  pretrained  the same recipe on 400 iterations, LR x0.1 at 300 (tools/gpu_compare.sh).
  scratch     the from-scratch recipe (make compare-scratch): random R-18, trainable BN, 800
              iterations, LR 0.02, per-parameter norm clipping at 5 (the demo's).
  demo        the 400-iteration `make demo` recipe itself (make compare-demo).
  --iters N   a pretrained protocol on N iterations: LR steps and LGD's schedule at the same
              fractions of the run (how long the baseline needs to converge); its runs go to
              output/compare_<protocol>_<N>, its results to results/compare_<protocol>_<N>*.

Rows: baseline; lgd (the config's LGD); lgd_class (MODEL.LGD.CLASS_IDENTITY class_channels: a
self-teacher that always knows each object's class); lgd_class_coverage (the same with
MODEL.LGD.REGION_MASK coverage: box edges painted to sub-cell precision); lgd_lambda0 (LAMBDA 0: the teacher's detection
loss through the shared head without distillation); lgd_readonly_head (TEACHER_LOSS_TRAINS_HEAD False:
the teacher's detection loss trains the self-teacher but not the shared head); lgd_nofreeze (no backbone freeze); lgd_guard
(TEACHER_GUARD.SWITCH_OFF_DISTILL: distillation off while the teacher's losses are not below the
student's); lgd_noP2 (teacher and distillation on p3-p6); baseline_bn (the pretrained body with
trainable BN and no frozen stage: the alternative to FrozenBN + FREEZE_AT 2); fgfi (frozen R-34 teacher of the same
recipe, twice the iterations, loaded with its run's own config.yaml; on the pretrained protocol the
R-34 body has its own classification pretraining); retinanet_baseline / retinanet_lgd.

For LGD rows the trainer evaluates the self-teacher oracle (the student's head on the teacher's
maps, built from the ground truth) at every evaluation (MODEL.LGD.REPORT_TEACHER), with
class-agnostic AP for both; this tool reads them from metrics.json, plots the teacher dashed beside
its student and prints per run whether the teacher was ahead while distillation was on.

Statistics: per row the mean and sample standard deviation of the final AP over seeds; per row
and seed the difference to the baseline of the same family and seed, its mean and a 95% t-interval
(t quantile with n-1 degrees of freedom). A difference is *resolved* when its interval excludes 0.

Writes (under --results-dir, default results/), NAME = compare_<protocol>[_quick|_ablations]:
  NAME.json        every run: final AP..APl, the AP curves (student, teacher, class-agnostic), fg
                   classification accuracies, minutes; the verdicts; per_evaluation: the
                   seed-paired AP differences at every evaluation (row vs baseline, vs control)
  NAME.md          the tables (printed too)
  NAME_ap.png      AP over iterations per row: mean line, min-max band over seeds; teacher dashed
  NAME_losses.png  total and per-term training losses, mean over seeds

  python tools/compare.py [--protocol pretrained_long|pretrained|scratch|demo] [--quick | --ablations]
                          [--iters N] [--seeds 1 2 3] [--rows baseline lgd ...] [--parallel 2]
                          [--reuse] [--summarise-only] [CONFIG OVERRIDES for every row]
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

import torch

from run_demo import METRICS, REPO, config_file, train


class Protocol:
    def __init__(self, name, max_iter, eval_period, overrides, pretrained=False, step_fractions=None):
        self.name, self.max_iter, self.eval_period = name, max_iter, eval_period
        self.overrides, self.pretrained = tuple(map(str, overrides)), pretrained
        self.step_fractions = step_fractions  # LR steps as fractions of the run (pretrained recipes)

    def with_length(self, iters):
        """The same recipe on ``iters`` iterations (``--iters``): LR steps at the same fractions of
        the run, LGD's schedule scaled with it; named ``<name>_<iters>`` (its own run folder)."""
        if self.step_fractions is None:
            raise SystemExit(f"--iters: protocol {self.name!r} has no length-scalable schedule "
                             f"(the pretrained ones have)")
        return pretrained_protocol(f"{self.name}_{iters}", iters, self.step_fractions)

    def lgd_schedule(self):
        """LGD's released schedule (30k pre-nondistill, 20k backbone freeze of 180k) scaled."""
        return ("MODEL.LGD.PRE_NONDISTILL_ITERS", round(self.max_iter * 30 / 180),
                "MODEL.LGD.PRE_FREEZE_STUDENT_BACKBONE_ITERS", round(self.max_iter * 20 / 180))

    def distill_start(self):
        return round(self.max_iter * 30 / 180)


def pretrained_protocol(name, iters, steps):
    """LGD's regime on ``iters`` iterations, LR steps at the fractions ``steps`` of the run."""
    return Protocol(name, iters, 100, (
        "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.BACKBONE.FREEZE_AT", 2,
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "value", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 1.0,
        "SOLVER.BASE_LR", 0.01, "SOLVER.WARMUP_ITERS", 50, "SOLVER.MAX_ITER", iters,
        "SOLVER.STEPS", tuple(round(iters * f) for f in steps), "TEST.EVAL_PERIOD", 100,
        "SOLVER.CHECKPOINT_PERIOD", iters,
    ), pretrained=True, step_fractions=steps)


PROTOCOLS = {
    "pretrained": pretrained_protocol("pretrained", 400, (0.75,)),
    # twice as long, with the LR steps of LGD's released 2x schedule (120k and 160k of 180k)
    "pretrained_long": pretrained_protocol("pretrained_long", 800, (2 / 3, 8 / 9)),
    "scratch": Protocol("scratch", 800, 100, (
        "SOLVER.MAX_ITER", 800, "SOLVER.STEPS", (480,), "SOLVER.WARMUP_ITERS", 100,
        "SOLVER.BASE_LR", 0.02, "TEST.EVAL_PERIOD", 100, "SOLVER.CHECKPOINT_PERIOD", 800,
    )),
    "demo": Protocol("demo", 400, 100, ("TEST.EVAL_PERIOD", 100, "SOLVER.CHECKPOINT_PERIOD", 400)),
}
CLASS_PRESERVING = ("MODEL.LGD.CLASS_IDENTITY", "class_channels")
ROWS = {  # row -> (family, config method, extra overrides, uses LGD's scaled schedule)
    "baseline": ("faster_rcnn", "baseline", (), False),
    # the alternative treatment of the pretrained body: trainable BN, nothing frozen
    "baseline_bn": ("faster_rcnn", "baseline", ("MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", 0), False),
    "lgd": ("faster_rcnn", "lgd", (), True),
    "lgd_class": ("faster_rcnn", "lgd", CLASS_PRESERVING, True),
    "lgd_class_coverage": ("faster_rcnn", "lgd", (*CLASS_PRESERVING, "MODEL.LGD.REGION_MASK", "coverage"), True),
    "lgd_lambda0": ("faster_rcnn", "lgd", ("MODEL.LGD.LAMBDA", 0.0), True),
    "lgd_readonly_head": ("faster_rcnn", "lgd", ("MODEL.LGD.TEACHER_LOSS_TRAINS_HEAD", False), True),
    "lgd_nofreeze": ("faster_rcnn", "lgd", ("MODEL.LGD.PRE_FREEZE_STUDENT_BACKBONE_ITERS", 0), True),
    "lgd_guard": ("faster_rcnn", "lgd", ("MODEL.LGD.TEACHER_GUARD.SWITCH_OFF_DISTILL", True), True),
    "lgd_noP2": ("faster_rcnn", "lgd", ("MODEL.LGD.IN_FEATURES", '["p3","p4","p5","p6"]'), True),
    "fgfi": ("faster_rcnn", "fgfi", (), False),
    "retinanet_baseline": ("retinanet", "baseline", (), False),
    "retinanet_lgd": ("retinanet", "lgd", (), True),
}
MAIN_ROWS = ("baseline", "lgd", "lgd_class")
QUICK_ROWS = ("baseline", "lgd")
ABLATION_ROWS = ("baseline", "baseline_bn", "lgd", "lgd_lambda0", "lgd_nofreeze", "lgd_guard",
                 "fgfi", "retinanet_baseline", "retinanet_lgd")
# Matched controls: (row, its control, the one thing in which they differ). Each is reported when
# both rows were run, with the seed-paired differences (the baseline comparison is the main table).
CONTROLS = (
    ("lgd", "lgd_lambda0", "the distillation loss (LAMBDA 1 vs 0; both train the teacher's detection loss)"),
    ("lgd_class", "lgd", "CLASS_IDENTITY class_channels vs attention"),
    ("lgd_readonly_head", "lgd", "TEACHER_LOSS_TRAINS_HEAD False vs True (the teacher's loss trains the head)"),
    ("lgd_class_coverage", "lgd_class", "REGION_MASK coverage vs cell_centres"),
    ("lgd_nofreeze", "lgd", "no backbone freeze at the start"),
    ("lgd_guard", "lgd", "TEACHER_GUARD.SWITCH_OFF_DISTILL"),
    ("lgd_noP2", "lgd", "teacher and distillation on p3-p6 only"),
)
# two-sided 95% t quantiles, degrees of freedom 1..10
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def baseline_of(row):
    """The row a row is paired with (baseline_bn: with the FrozenBN baseline)."""
    return "retinanet_baseline" if row.startswith("retinanet") else "baseline"


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


def curve(out_dir, key="bbox/AP", max_iter=None):
    """[(iteration, value)] of every evaluation train_net.py ran during training (the final one is
    logged at iteration max_iter, the periodic ones at k * period - 1)."""
    points = [(r["iteration"] + 1, r[key]) for r in read_metrics(out_dir) if key in r]
    return [(min(it, max_iter) if max_iter else it, v) for it, v in points]


def run_metrics(out_dir):
    rows = [r for r in read_metrics(out_dir) if "bbox/AP" in r]
    if not rows:
        raise RuntimeError(f"no bbox evaluation in {out_dir}/metrics.json")
    return {m: rows[-1][f"bbox/{m}"] for m in METRICS}


def mean_over_window(out_dir, key, first, last):
    """Mean of a training scalar (e.g. fast_rcnn/fg_cls_accuracy) over the logged rows of
    iterations first+1 .. last (1-based: the rows after iteration ``first``)."""
    values = [r[key] for r in read_metrics(out_dir) if key in r and first < r["iteration"] + 1 <= last]
    return statistics.mean(values) if values else None


def teacher_report(student, teacher, teacher50, distill_start, max_iter):
    """Per run: at how many evaluations while distillation was on (iteration > distill_start) the
    teacher oracle's AP was above the student's, and whether the real-oracle target held after the
    first quarter (teacher AP >= student AP + 10 and teacher AP50 >= 90 at every evaluation)."""
    s, t, t50 = dict(student), dict(teacher), dict(teacher50)
    during = [it for it in sorted(t) if it > distill_start and it in s]
    ahead = [it for it in during if t[it] > s[it]]
    late = [it for it in sorted(t) if it > max_iter / 4 and it in s]
    oracle = bool(late) and all(t[it] >= s[it] + 10 and t50.get(it, 0) >= 90 for it in late)
    return {"evaluations_during_distillation": len(during), "teacher_ahead": len(ahead),
            "real_oracle_after_first_quarter": oracle}


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
    the interval contains 0; the verdict keeps the per-seed differences."""
    mean, half = t_interval(diffs)
    resolved = abs(mean) > half
    cell = (f"{mean:+.1f} (one seed: no interval)" if len(diffs) == 1 else
            f"{mean:+.1f} ({mean - half:+.1f} to {mean + half:+.1f})" + ("" if resolved else ", unresolved"))
    return cell, {"diff": mean, "ci": [mean - half, mean + half], "resolved": resolved, "n": len(diffs),
                  "per_seed": [round(d, 2) for d in diffs]}


def matched_table(runs, matched, metrics):
    """Seed-paired differences between matched rows: ``matched`` = (row, control, what differs)
    triples, ``metrics`` = (key, label) pairs; a pair is reported when both rows have runs of a
    seed with the metric. Returns (markdown table or "", verdicts {"row-vs-control": {key: ...}})."""
    head = "".join(f" | {label} diff per seed | mean (95% CI)" for _, label in metrics)
    lines = [f"| row | control | what differs | seeds{head} |", "|---" * (4 + 2 * len(metrics)) + "|"]
    verdicts = {}
    for row, control, what in matched:
        cells, n = [], 0
        for key, _ in metrics:  # each metric paired on the seeds where both runs have it
            ctrl = {r["seed"]: r[key] for r in runs if r["row"] == control and r.get(key) is not None}
            diffs = [r[key] - ctrl[r["seed"]] for r in sorted(runs, key=lambda r: r["seed"])
                     if r["row"] == row and r.get(key) is not None and r["seed"] in ctrl]
            if not diffs:
                cells += ["-", "-"]
                continue
            cell, verdicts.setdefault(f"{row}-vs-{control}", {})[key] = paired_cell(diffs)
            cells += [" / ".join(f"{d:+.1f}" for d in diffs), cell]
            n = max(n, len(diffs))
        if n:
            lines.append(f"| {row} | {control} | {what} | {n} | " + " | ".join(cells) + " |")
    return ("\n".join(lines) if len(lines) > 2 else ""), verdicts


def _mean(values, fmt="{:.1f}"):
    values = [v for v in values if v is not None]
    return fmt.format(statistics.mean(values)) if values else "-"


def summarise(runs, rows):
    """The main table (AP per row, paired differences to the baseline of the row's family) and
    the teacher table (LGD rows: oracle AP, class-agnostic APs, fg accuracies at the end)."""
    lines = ["| row | seeds | AP mean +- std | AP per seed | AP50 mean | paired AP diff to baseline "
             "(95% CI) | resolved | last-quarter AP gain | train min per run |",
             "|---|---|---|---|---|---|---|---|---|"]
    verdicts = {}
    for row in rows:
        rs = sorted((r for r in runs if r["row"] == row), key=lambda r: r["seed"])
        if not rs:
            continue
        base = {r["seed"]: r["AP"] for r in runs if r["row"] == baseline_of(row)}
        aps = [r["AP"] for r in rs]
        std = statistics.stdev(aps) if len(aps) > 1 else float("nan")
        diff_cell, resolved = "-", "-"
        if row != baseline_of(row):
            diffs = [r["AP"] - base[r["seed"]] for r in rs if r["seed"] in base]
            if diffs:
                _, v = paired_cell(diffs)
                verdicts[row] = v
                diff_cell = f"{v['diff']:+.1f} ({v['ci'][0]:+.1f} to {v['ci'][1]:+.1f})"
                resolved = "yes" if v["resolved"] else "no"
        lines.append(
            f"| {row} | {len(rs)} | {statistics.mean(aps):.1f} +- {std:.1f} "
            f"| {' / '.join(f'{a:.1f}' for a in aps)} "
            f"| {statistics.mean(r['AP50'] for r in rs):.1f} | {diff_cell} | {resolved} "
            f"| {_mean([r.get('last_quarter_gain') for r in rs], '{:+.1f}')} "
            f"| {_mean([r.get('train_minutes') for r in rs])} |"
        )
    teacher_rows = [row for row in rows if any(r.get("teacher_curve") for r in runs if r["row"] == row)]
    if teacher_rows:
        lines += ["", "At the last evaluation, mean over seeds (class-agnostic: every class merged into "
                  "one; fg acc: the box head's foreground classification accuracy over the last "
                  "evaluation period of training):", "",
                  "| row | student AP / AP50 | student class-agnostic AP / AP50 | teacher oracle AP / AP50 "
                  "| teacher class-agnostic AP / AP50 | fg acc student / teacher | teacher ahead of "
                  "student while distilling (evaluations) | real oracle (runs) |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in teacher_rows:
            rs = [r for r in runs if r["row"] == row and r.get("teacher_curve")]
            last = lambda key: [r[key][-1][1] for r in rs if r.get(key)]  # noqa: E731
            rep = [r["teacher_report"] for r in rs]
            lines.append(
                f"| {row} | {_mean([r['AP'] for r in rs])} / {_mean([r['AP50'] for r in rs])} "
                f"| {_mean(last('agnostic_curve'))} / {_mean(last('agnostic50_curve'))} "
                f"| {_mean(last('teacher_curve'))} / {_mean(last('teacher50_curve'))} "
                f"| {_mean(last('teacher_agnostic_curve'))} / {_mean(last('teacher_agnostic50_curve'))} "
                f"| {_mean([r.get('fg_acc') for r in rs], '{:.2f}')} / {_mean([r.get('fg_acc_tea') for r in rs], '{:.2f}')} "
                f"| {sum(x['teacher_ahead'] for x in rep)} of {sum(x['evaluations_during_distillation'] for x in rep)} "
                f"| {sum(x['real_oracle_after_first_quarter'] for x in rep)} of {len(rep)} |"
            )
    matched, matched_verdicts = matched_table(runs, CONTROLS, (("AP", "AP"), ("teacher_AP", "teacher oracle AP")))
    if matched:
        lines += ["", "Matched controls (rows that differ in one thing; seed-paired differences at the "
                  "last evaluation):", "", matched]
        verdicts.update(matched_verdicts)
    return "\n".join(lines), verdicts


def curves_table(runs, rows):
    """Markdown: per row and seed, the student's AP at every evaluation and, for LGD rows, the
    teacher oracle's (the ``curve`` / ``teacher_curve`` entries of the JSON)."""
    lines = ["", "AP at every evaluation (iteration: student AP / teacher oracle AP):", "",
             "| row | seed | " + "AP per evaluation |", "|---|---|---|"]
    for row in rows:
        for r in sorted((r for r in runs if r["row"] == row and r.get("curve")), key=lambda r: r["seed"]):
            teacher = dict(r.get("teacher_curve") or [])
            cells = [f"{it}: {ap:.1f}" + (f" / {teacher[it]:.1f}" if it in teacher else "")
                     for it, ap in r["curve"]]
            lines.append(f"| {row} | {r['seed']} | {', '.join(cells)} |")
    return "\n".join(lines) + "\n" if len(lines) > 4 else ""


def per_evaluation_table(runs, rows):
    """Seed-paired AP differences at every evaluation: each row against the baseline of its family
    and, where both were run, against its matched control (CONTROLS). Returns (markdown, data
    {"row-vs-control": [{"iteration", paired_cell's verdict, "above"}]}); a cell reads
    "mean (95% CI) k/n", k of the n pairs above their control."""
    pairs = [(row, baseline_of(row)) for row in rows if row != baseline_of(row)]
    pairs += [(row, control) for row, control, _ in CONTROLS if row in rows and control in rows]
    data, lines = {}, []
    for row, control in pairs:
        ctrl = {r["seed"]: dict(r["curve"]) for r in runs if r["row"] == control and r.get("curve")}
        mine = {r["seed"]: dict(r["curve"]) for r in runs if r["row"] == row and r.get("curve") and r["seed"] in ctrl}
        iterations = sorted({it for seed in mine for it in mine[seed] if it in ctrl[seed]})
        entries = []
        for it in iterations:
            diffs = [mine[s][it] - ctrl[s][it] for s in sorted(mine) if it in mine[s] and it in ctrl[s]]
            entries.append({"iteration": it, **paired_cell(diffs)[1], "above": sum(d > 0 for d in diffs)})
        if entries:
            data[f"{row}-vs-{control}"] = entries
            cells = [f"{e['iteration']}: {e['diff']:+.1f} ({e['ci'][0]:+.1f} to {e['ci'][1]:+.1f}) "
                     f"{e['above']}/{len(e['per_seed'])}" for e in entries]
            lines.append(f"| {row} | {control} | {', '.join(cells)} |")
    if not lines:
        return "", data
    head = ["", "Seed-paired AP difference at every evaluation (iteration: mean (95% CI) pairs above / pairs):",
            "", "| row | control | difference per evaluation |", "|---|---|---|"]
    return "\n".join(head + lines) + "\n", data


def last_quarter_gain(ap_curve, max_iter):
    """AP at the end minus AP at the last evaluation at or before 3/4 of training."""
    if not ap_curve:
        return None
    early = [ap for it, ap in ap_curve if it <= 0.75 * max_iter]
    return ap_curve[-1][1] - early[-1] if early else None


CURVES = {"curve": "bbox/AP", "agnostic_curve": "bbox/AP_agnostic", "agnostic50_curve": "bbox/AP50_agnostic",
          "teacher_curve": "teacher_bbox/AP", "teacher50_curve": "teacher_bbox/AP50",
          "teacher_agnostic_curve": "teacher_bbox/AP_agnostic",
          "teacher_agnostic50_curve": "teacher_bbox/AP50_agnostic"}


def run_result(row, seed, row_dir, protocol, minutes=None):
    result = {"row": row, "seed": seed, "minutes": minutes, **run_metrics(row_dir),
              "train_minutes": training_minutes(row_dir)}
    result.update({name: curve(row_dir, key, protocol.max_iter) for name, key in CURVES.items()})
    result["last_quarter_gain"] = last_quarter_gain(result["curve"], protocol.max_iter)
    first = protocol.max_iter - protocol.eval_period
    result["fg_acc"] = mean_over_window(row_dir, "fast_rcnn/fg_cls_accuracy", first, protocol.max_iter)
    result["fg_acc_tea"] = mean_over_window(row_dir, "tea/fast_rcnn/fg_cls_accuracy", first, protocol.max_iter)
    if result["teacher_curve"]:
        result["teacher_AP"] = result["teacher_curve"][-1][1]
        result["teacher_report"] = teacher_report(
            result["curve"], result["teacher_curve"], result["teacher50_curve"],
            protocol.distill_start(), protocol.max_iter)
    return result


def plot(runs, rows, output_root, results_dir, name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
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
    ax.set_title("AP over training: mean over seeds, band = min-max; teacher oracle dashed")
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
    plt.close("all")


# overrides of every row that the classification pretraining takes too (where and how it runs,
# not what it learns)
RUNTIME_KEYS = ("MODEL.DEVICE", "SOLVER.AMP.", "DATALOADER.")


def runtime_opts(opts):
    """The (key, value) pairs of ``opts`` whose key is a RUNTIME_KEYS one, flattened."""
    pairs = zip(opts[::2], opts[1::2])
    return tuple(x for k, v in pairs if k.startswith(RUNTIME_KEYS) for x in (k, v))


def pretrained_body(output_root, threads, opts=(), depth=18):
    """The classification-pretrained R-``depth`` body (trained once, with the rows' runtime
    overrides ``opts``): its bottom-up weights only, so every seed initialises the FPN and heads
    itself. R-18: the students'; R-34: FGFI's teacher's on the pretrained protocol."""
    tag = "" if depth == 18 else f"_R{depth}"
    body = os.path.join(output_root, f"pretrained_body{tag}.pth")
    if os.path.isfile(body):
        return body
    full = os.path.join(output_root, f"pretrain{tag}_seed1", "model_final.pth")
    if not os.path.isfile(full):
        depth_opts = () if depth == 18 else ("MODEL.RESNETS.DEPTH", str(depth))
        train("pretrain", 1, output_root, (*depth_opts, *opts), threads, metrics=lambda out_dir: {},
              run_name=f"pretrain{tag}")
    state = torch.load(full, map_location="cpu", weights_only=True)["model"]
    keep = {k: v for k, v in state.items() if k.startswith("backbone.bottom_up.")}
    if not keep:
        raise RuntimeError(f"{full} has no backbone.bottom_up.* weights")
    torch.save({"model": keep, "__author__": f"classification pretraining of R-{depth} (tools/compare.py)"}, body)
    return body


def fgfi_teacher_opts(protocol, common, opts=(), teacher_body=None):
    """Overrides of FGFI's teacher run (the R-34 of configs/Demo/faster_rcnn_R_34_FPN_teacher.yaml):
    the protocol's recipe with twice the iterations; ``teacher_body`` (the pretrained protocol: the
    R-34's own classification pretraining) replaces the students' R-18 body."""
    extra = (*common, "SOLVER.MAX_ITER", 2 * protocol.max_iter,
             "SOLVER.STEPS", (round(1.5 * protocol.max_iter),), "TEST.EVAL_PERIOD", 0,
             "SOLVER.CHECKPOINT_PERIOD", 2 * protocol.max_iter)
    if teacher_body:
        extra = (*extra, "MODEL.WEIGHTS", teacher_body)
    return tuple(map(str, (*extra, *opts)))


def fgfi_student_opts(teacher_dir):
    """FGFI's teacher as it was trained: its run's own config.yaml (FrozenBN and depth included)
    and final weights."""
    return ("MODEL.FGFI.TEACHER.CONFIG_FILE", os.path.join(teacher_dir, "config.yaml"),
            "MODEL.FGFI.TEACHER.WEIGHTS", os.path.join(teacher_dir, "model_final.pth"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="pretrained_long")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="baseline and LGD, 2 seeds")
    group.add_argument("--ablations", action="store_true", help=f"rows {ABLATION_ROWS}, 3 seeds")
    parser.add_argument("--iters", type=int, default=None,
                        help="a pretrained protocol on this many iterations (LR steps and LGD's schedule "
                             "at the same fractions; runs in output/compare_<protocol>_<iters>)")
    parser.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--output-root", default=None)
    parser.add_argument("--results-dir", default=os.path.join(REPO, "results"))
    parser.add_argument("--name", default=None, help="results file stem (default compare_<protocol>[_quick|_ablations])")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs (model_final.pth)")
    parser.add_argument("--summarise-only", action="store_true",
                        help="train nothing: the table and plots of the finished runs among --rows x --seeds")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every row")
    args = parser.parse_args()
    protocol = PROTOCOLS[args.protocol]
    if args.iters and args.iters != protocol.max_iter:
        protocol = protocol.with_length(args.iters)
    rows = tuple(args.rows or (QUICK_ROWS if args.quick else ABLATION_ROWS if args.ablations else MAIN_ROWS))
    seeds = args.seeds or ([1, 2] if args.quick else [1, 2, 3] if args.ablations else [1, 2, 3, 4, 5])
    name = args.name or f"compare_{protocol.name}" + ("_quick" if args.quick else "_ablations" if args.ablations else "")
    # one run folder per protocol: the quick, main and ablation targets share (and --reuse) runs
    output_root = args.output_root or os.path.join(REPO, "output", f"compare_{protocol.name}")
    os.makedirs(args.results_dir, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // args.parallel)
    start = time.time()
    subprocess.run([sys.executable, "-W", "ignore", "-c",
                    "import lgd_detectron2.data as d; d.ensure_demo_data()"], cwd=REPO, check=True)
    common = protocol.overrides
    # the pretrained protocols share one classification-pretrained body (and FGFI's R-34 one)
    body_root = args.output_root or os.path.join(REPO, "output", "compare_pretrained")
    if protocol.pretrained:
        common = (*common, "MODEL.WEIGHTS", pretrained_body(body_root, os.cpu_count() or 1,
                                                           runtime_opts(args.opts)))
    teacher_dir = os.path.join(output_root, "teacher_seed1")
    teacher_weights = os.path.join(teacher_dir, "model_final.pth")

    def finished(row, seed):
        path = os.path.join(output_root, f"{row}_seed{seed}")
        return (args.reuse or args.summarise_only) and os.path.exists(os.path.join(path, "model_final.pth"))

    def run_row(row, seed, teacher=None):
        family, method, extra, scheduled = ROWS[row]
        extra = (*common, *(protocol.lgd_schedule() if scheduled and protocol.name != "demo" else ()),
                 *extra, *args.opts)
        if method == "fgfi":
            if teacher is not None:  # None only with --summarise-only (nothing trains)
                teacher.result()
            extra = (*extra, *fgfi_student_opts(teacher_dir))
        row_dir = os.path.join(output_root, f"{row}_seed{seed}")
        minutes = None
        if not finished(row, seed):
            # Detectron2 appends to metrics.json: a rerun must not mix with an earlier run's rows
            if os.path.exists(os.path.join(row_dir, "metrics.json")):
                os.remove(os.path.join(row_dir, "metrics.json"))
            _, minutes = train(method, seed, output_root, tuple(map(str, extra)), threads,
                               family=family, metrics=run_metrics, run_name=row)
        return run_result(row, seed, row_dir, protocol, minutes)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        teacher = None
        if "fgfi" in rows:
            if (args.reuse or args.summarise_only) and os.path.exists(teacher_weights):
                teacher = pool.submit(lambda: (run_metrics(teacher_dir), None))
            elif not args.summarise_only:
                body = (pretrained_body(body_root, os.cpu_count() or 1, runtime_opts(args.opts), depth=34)
                        if protocol.pretrained else None)
                teacher = pool.submit(train, "teacher", 1, output_root,
                                      fgfi_teacher_opts(protocol, common, args.opts, body), threads,
                                      metrics=lambda out_dir: {})
        # FGFI rows last (they wait for the teacher, which trains meanwhile); otherwise seed by
        # seed, so that an interrupted command leaves complete pairs (--summarise-only), the
        # longer LGD runs of a seed first
        order = sorted(((r, s) for s in seeds for r in rows),
                       key=lambda j: (j[0] == "fgfi", j[1], "baseline" in j[0]))
        if args.summarise_only:
            order = [(r, s) for r, s in order if finished(r, s)]
        futures = [pool.submit(run_row, r, s, teacher) for r, s in order]
        runs = [f.result() for f in futures]
        if teacher:
            teacher.result()

    table, verdicts = summarise(runs, rows)
    total = round((time.time() - start) / 60, 1)
    report = {"protocol": protocol.name, "overrides": list(common), "lgd_schedule": list(protocol.lgd_schedule()),
              "seeds": seeds, "runs": runs, "verdicts": verdicts, "total_minutes": total}
    header = (f"bbox AP on demo_shapes_val (150 images) after {protocol.max_iter} iterations, protocol "
              f"'{protocol.name}', seeds {seeds}; ")
    if args.summarise_only:
        header += "assembled from finished runs (--summarise-only); minutes: each run's training time."
    else:
        header += f"this command took {total} min on {os.cpu_count()} CPU cores ({args.parallel} runs in parallel)."
    md = f"{header}\n\n{table}\n"
    reports = [r for r in runs if r.get("teacher_report")]
    if reports:
        md += "\nPer LGD run: evaluations during distillation at which the teacher oracle's AP was above its student's:\n\n"
        for r in sorted(reports, key=lambda r: (r["row"], r["seed"])):
            rep = r["teacher_report"]
            md += (f"- {r['row']} seed {r['seed']}: teacher ahead at {rep['teacher_ahead']} of "
                   f"{rep['evaluations_during_distillation']}; final oracle {r['teacher_curve'][-1][1]:.1f} "
                   f"(AP50 {r['teacher50_curve'][-1][1]:.1f}) vs student {r['AP']:.1f}; real oracle after the "
                   f"first quarter: {'yes' if rep['real_oracle_after_first_quarter'] else 'no'}\n")
    per_evaluation, report["per_evaluation"] = per_evaluation_table(runs, rows)
    md += per_evaluation + curves_table(runs, rows)
    with open(os.path.join(args.results_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.results_dir, f"{name}.md"), "w") as f:
        f.write(md)
    plot(runs, rows, output_root, args.results_dir, name)
    print(md)


if __name__ == "__main__":
    main()
