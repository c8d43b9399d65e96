"""tools/visualize_teacher.py and tools/export_student.py on a small LGD checkpoint; the statistics of
tools/compare.py."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from detectron2.modeling import build_model

from common import DEMO_LGD, REPO, load_cfg

TINY = ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64"]


def test_visualize_teacher_writes_one_png_per_level(tmp_path):
    cfg = load_cfg(DEMO_LGD, *TINY)
    torch.manual_seed(0)
    ckpt = tmp_path / "lgd.pth"
    torch.save({"model": build_model(cfg).state_dict()}, ckpt)
    out = tmp_path / "maps"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "visualize_teacher.py"), "--config-file", DEMO_LGD,
         "--weights", str(ckpt), "--dataset", "demo_shapes_val", "--index", "2", "--output", str(out),
         "MODEL.DEVICE", "cpu", *TINY],
        cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == [f"teacher_p{i}.png" for i in range(2, 7)]
    width, height = Image.open(out / "teacher_p2.png").size
    assert width > 800 and height > 200


def test_compare_pretraining_takes_the_rows_runtime_overrides():
    """tools/compare.py trains the classification pretraining with the rows' device, AMP and data
    loader overrides (a GPU run pretrains on the GPU), not with their schedule or model keys."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import compare

    opts = ["MODEL.DEVICE", "cuda", "SOLVER.MAX_ITER", "20", "SOLVER.AMP.ENABLED", "True",
            "MODEL.LGD.LAMBDA", "0", "SOLVER.AMP.DTYPE", "bfloat16", "DATALOADER.NUM_WORKERS", "2"]
    assert compare.runtime_opts(opts) == ("MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", "True",
                                          "SOLVER.AMP.DTYPE", "bfloat16", "DATALOADER.NUM_WORKERS", "2")
    assert compare.runtime_opts([]) == ()


def test_compare_pretrained_protocols_scale_lgd_schedule_and_lr_steps():
    """The two pretrained protocols: one recipe, 400 iterations with the LR step at 3/4, or 800 with
    the steps of LGD's released 2x schedule (120k and 160k of 180k); LGD's distillation start
    (30k of 180k) and backbone freeze (20k) scaled to the run."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import compare

    short, long = compare.PROTOCOLS["pretrained"], compare.PROTOCOLS["pretrained_long"]
    opts = lambda p: dict(zip(p.overrides[::2], p.overrides[1::2]))  # noqa: E731
    assert (opts(short)["SOLVER.MAX_ITER"], opts(short)["SOLVER.STEPS"]) == ("400", "(300,)")
    assert (opts(long)["SOLVER.MAX_ITER"], opts(long)["SOLVER.STEPS"]) == ("800", "(533, 711)")
    same = {k: v for k, v in opts(short).items() if k not in ("SOLVER.MAX_ITER", "SOLVER.STEPS",
                                                              "SOLVER.CHECKPOINT_PERIOD")}
    assert same.items() <= opts(long).items() and same["MODEL.RESNETS.NORM"] == "FrozenBN"
    assert short.lgd_schedule() == ("MODEL.LGD.PRE_NONDISTILL_ITERS", 67,
                                    "MODEL.LGD.PRE_FREEZE_STUDENT_BACKBONE_ITERS", 44)
    assert long.lgd_schedule() == ("MODEL.LGD.PRE_NONDISTILL_ITERS", 133,
                                   "MODEL.LGD.PRE_FREEZE_STUDENT_BACKBONE_ITERS", 89)
    assert long.pretrained and long.distill_start() == 133
    # --iters: the long recipe on 1200 iterations, steps and LGD's schedule at the same fractions
    longer = long.with_length(1200)
    assert longer.name == "pretrained_long_1200" and longer.pretrained
    assert (opts(longer)["SOLVER.MAX_ITER"], opts(longer)["SOLVER.STEPS"]) == ("1200", "(800, 1067)")
    assert {k: v for k, v in opts(longer).items() if k not in ("SOLVER.MAX_ITER", "SOLVER.STEPS",
                                                               "SOLVER.CHECKPOINT_PERIOD")} == same
    assert longer.lgd_schedule() == ("MODEL.LGD.PRE_NONDISTILL_ITERS", 200,
                                     "MODEL.LGD.PRE_FREEZE_STUDENT_BACKBONE_ITERS", 133)
    with pytest.raises(SystemExit, match="scratch"):
        compare.PROTOCOLS["scratch"].with_length(1200)


def test_compare_statistics_hand_worked(tmp_path):
    """tools/compare.py: paired differences (to the baseline of the row's family), their 95%
    t-interval, the resolved flag, the last-quarter gain, the teacher report and the curves read
    from a run's metrics.json."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import compare

    # diffs -2, -4: mean -3, sd sqrt(2), t(0.975, 1) = 12.706 -> half-width 12.706 * sqrt(2) / sqrt(2)
    mean, half = compare.t_interval([-2.0, -4.0])
    assert mean == -3.0 and abs(half - 12.706) < 1e-9
    runs = [{"row": r, "seed": s, "AP": ap, "AP50": ap, "last_quarter_gain": 0.5, "train_minutes": 1.0}
            for r, s, ap in [("baseline", 1, 50.0), ("baseline", 2, 40.0), ("baseline", 3, 45.0),
                             ("lgd", 1, 45.0), ("lgd", 2, 35.1), ("lgd", 3, 39.9),
                             ("retinanet_baseline", 1, 20.0), ("retinanet_baseline", 2, 22.0),
                             ("retinanet_lgd", 1, 21.0), ("retinanet_lgd", 2, 24.0)]]
    table, verdicts = compare.summarise(runs, ("baseline", "lgd", "retinanet_baseline", "retinanet_lgd"))
    assert verdicts["lgd"]["resolved"] and verdicts["lgd"]["n"] == 3
    assert abs(verdicts["lgd"]["diff"] - (-5.0)) < 1e-9
    assert verdicts["retinanet_lgd"]["per_seed"] == [1.0, 2.0]  # paired with the RetinaNet baseline
    assert "| lgd | 3 | 40.0 +- 5.0 |" in table
    assert "Matched controls" not in table  # no control row was run
    # LGD against its LAMBDA-0 control, seed by seed: +1, 0, -1 -> mean 0, unresolved
    # and in the teacher oracle's final AP: +2, +4 (seed 3's control has no teacher: that metric
    # is not paired for seed 3, AP still is)
    for r, teacher in zip(runs[3:6], (20.0, 24.0, 30.0)):
        r["teacher_AP"] = teacher
    control = [{"row": "lgd_lambda0", "seed": s, "AP": ap, "AP50": ap, "teacher_AP": t}
               for s, ap, t in [(1, 44.0, 18.0), (2, 35.1, 20.0), (3, 40.9, None)]]
    table, verdicts = compare.summarise(runs + control, ("baseline", "lgd", "lgd_lambda0"))
    v = verdicts["lgd-vs-lgd_lambda0"]
    assert v["AP"]["per_seed"] == [1.0, 0.0, -1.0] and v["teacher_AP"]["per_seed"] == [2.0, 4.0]
    assert v["AP"]["diff"] == pytest.approx(0.0, abs=1e-9) and not v["AP"]["resolved"]
    assert v["teacher_AP"]["diff"] == pytest.approx(3.0) and v["teacher_AP"]["n"] == 2
    assert ("| lgd | lgd_lambda0 | the distillation loss (LAMBDA 1 vs 0; both train the teacher's detection loss) "
            "| 3 | +1.0 / +0.0 / -1.0 |") in table
    assert "| +2.0 / +4.0 | +3.0 (-9.7 to +15.7), unresolved |" in table
    # the curves: student at every evaluation, teacher where it was evaluated
    runs[3]["curve"], runs[3]["teacher_curve"] = [[100, 1.25], [200, 3.0]], [[200, 7.5]]
    curves = compare.curves_table(runs, ("baseline", "lgd"))
    assert "| lgd | 1 | 100: 1.2, 200: 3.0 / 7.5 |" in curves and "| baseline |" not in curves
    # per evaluation, paired by seed: lgd minus baseline at 100 and 200 (seeds 1-2; seed 3 has no
    # lgd curve), and lgd minus its lambda-0 control where that has curves (seed 1 only)
    runs[0]["curve"], runs[1]["curve"] = [[100, 1.0], [200, 4.0]], [[100, 2.0], [200, 1.0]]
    runs[4]["curve"] = [[100, 0.0], [200, 4.0]]
    control[0]["curve"] = [[100, 3.25], [200, 3.0]]
    table, data = compare.per_evaluation_table(runs + control, ("baseline", "lgd", "lgd_lambda0"))
    at = {e["iteration"]: e for e in data["lgd-vs-baseline"]}
    assert at[100]["per_seed"] == [0.25, -2.0] and at[100]["above"] == 1
    assert at[200]["per_seed"] == [-1.0, 3.0] and at[200]["diff"] == pytest.approx(1.0)
    assert at[200]["ci"][0] == pytest.approx(1.0 - 12.706 * 8 ** 0.5 / 2 ** 0.5)
    assert [e["per_seed"] for e in data["lgd-vs-lgd_lambda0"]] == [[-2.0], [0.0]]
    assert "| lgd | baseline | 100: -0.9 (-15.2 to +13.4) 1/2, 200: +1.0 (-24.4 to +26.4) 1/2 |" in table
    assert [e["per_seed"] for e in data["lgd_lambda0-vs-baseline"]] == [[2.25], [-1.0]]
    ap_curve = [(100 * i, float(i)) for i in range(1, 9)]
    assert compare.last_quarter_gain(ap_curve, 800) == 8.0 - 6.0  # from iteration 600
    assert compare.last_quarter_gain(ap_curve, 400) == 8.0 - 3.0  # from iteration 300
    # teacher ahead at all 3 evaluations after the distillation start (iteration 100);
    # the real-oracle target (>= student + 10 and AP50 >= 90 after iteration 100) fails at 300
    student = [(100, 5.0), (200, 10.0), (300, 20.0), (400, 30.0)]
    teacher = [(100, 1.0), (200, 25.0), (300, 21.0), (400, 45.0)]
    teacher50 = [(100, 10.0), (200, 95.0), (300, 95.0), (400, 91.0)]
    rep = compare.teacher_report(student, teacher, teacher50, distill_start=100, max_iter=400)
    assert rep == {"evaluations_during_distillation": 3, "teacher_ahead": 3,
                   "real_oracle_after_first_quarter": False}
    teacher[1] = (200, 9.0)
    assert compare.teacher_report(student, teacher, teacher50, 100, 400)["teacher_ahead"] == 2
    teacher[1], teacher[2] = (200, 25.0), (300, 31.0)
    assert compare.teacher_report(student, teacher, teacher50, 100, 400)["real_oracle_after_first_quarter"]
    teacher50[3] = (400, 89.0)
    assert not compare.teacher_report(student, teacher, teacher50, 100, 400)["real_oracle_after_first_quarter"]
    run = tmp_path / "run"
    run.mkdir()
    # as Detectron2 logs them: training rows at iteration k-1, periodic evaluations at 99, the
    # final evaluation at max_iter (200)
    rows = [{"iteration": 49, "fast_rcnn/fg_cls_accuracy": 0.5, "tea/fast_rcnn/fg_cls_accuracy": 0.25},
            {"iteration": 99, "fast_rcnn/fg_cls_accuracy": 0.7, "tea/fast_rcnn/fg_cls_accuracy": 0.75},
            {"iteration": 99, "bbox/AP": 12.5, "teacher_bbox/AP": 20.0, "bbox/AP_agnostic": 15.0},
            {"iteration": 149, "fast_rcnn/fg_cls_accuracy": 0.9},
            {"iteration": 200, "bbox/AP": 30.0, "teacher_bbox/AP": 25.0}]
    (run / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows))
    assert compare.curve(str(run), max_iter=200) == [(100, 12.5), (200, 30.0)]
    assert compare.curve(str(run), "teacher_bbox/AP", 200) == [(100, 20.0), (200, 25.0)]
    assert compare.curve(str(run), "bbox/AP_agnostic", 200) == [(100, 15.0)]
    # the rows after iteration 50 up to 100: only the one at 100 (0-based 99)
    assert compare.mean_over_window(str(run), "fast_rcnn/fg_cls_accuracy", 50, 100) == pytest.approx(0.7)
    assert compare.mean_over_window(str(run), "fast_rcnn/fg_cls_accuracy", 0, 200) == pytest.approx(0.7)
    assert compare.mean_over_window(str(run), "tea/fast_rcnn/fg_cls_accuracy", 100, 200) is None


def test_compare_adv_and_blur_tables_hand_worked():
    """tools/compare_adv.py and tools/compare_blur.py: paired differences to the equal-budget
    control, the survey's ordering checks, and blur_skd sharing the runs of the ablation whose
    self-teacher choices its YAML has."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import compare_adv
    import compare_blur

    runs = [{"row": r, "seed": s, "AP_clean": c, "AP_adv": a, "AP_pgd": p, "train_minutes": 1.0}
            for r, s, c, a, p in [("start", 1, 30.0, 20.0, 10.0), ("finetune", 1, 32.0, 21.0, 11.0),
                                  ("finetune", 2, 34.0, 23.0, 12.0), ("udfa", 1, 33.0, 25.0, 15.0),
                                  ("udfa", 2, 35.0, 27.0, 16.0)]]
    runs += [{"row": "adv_train", "seed": s, "AP_clean": c, "AP_adv": a}  # older runs: no PGD evaluation
             for s, c, a in [(1, 31.0, 24.0), (2, 33.0, 26.0)]]
    table, verdicts = compare_adv.summarise(runs, ["finetune", "adv_train", "udfa"])
    assert verdicts["udfa"]["AP_adv"]["diff"] == 4.0 and verdicts["udfa"]["AP_adv"]["ci"] == [4.0, 4.0]
    assert verdicts["udfa"]["AP_pgd"]["diff"] == 4.0 and verdicts["udfa"]["AP_clean"]["resolved"]
    lines = table.splitlines()
    assert lines[0] == ("| row | seeds | clean AP | 1-step AP | PGD-10 AP "
                        "| clean AP diff to finetune per seed: mean (95% CI) "
                        "| 1-step AP diff to finetune per seed: mean (95% CI) "
                        "| PGD-10 AP diff to finetune per seed: mean (95% CI) | train min per run |")
    assert ("| udfa | 2 | 34.0 (33.0-35.0) | 26.0 (25.0-27.0) | 15.5 (15.0-16.0) | +1.0 / +1.0: +1.0 (+1.0 to +1.0) "
            "| +4.0 / +4.0: +4.0 (+4.0 to +4.0) | +4.0 / +4.0: +4.0 (+4.0 to +4.0) | 1.0 |") in lines
    assert ("| adv_train | 2 | 32.0 (31.0-33.0) | 25.0 (24.0-26.0) | - | -1.0 / -1.0: -1.0 (-1.0 to -1.0) "
            "| +3.0 / +3.0: +3.0 (+3.0 to +3.0) | - | - |") in lines
    assert verdicts["udfa"]["AP_pgd"]["per_seed"] == [4.0, 4.0]
    assert "AP_pgd" not in verdicts["adv_train"]

    def blur_run(row, seed, sharp, blur, prefix=""):
        return {"row": row, "seed": seed, f"{prefix}AP_sharp": sharp, f"{prefix}AP_blur_mean": blur,
                **{f"{prefix}AP_blur{s}": blur for s in compare_blur.SEVERITIES}}

    # matched rows, seed-paired: blur_skd - blur_kd_deblur = +2, -1 (blurred mean); only seeds
    # run by both rows pair (seed 3 of blur_skd has no partner)
    runs = [blur_run("blur_kd_deblur", 1, 38.0, 22.0), blur_run("blur_kd_deblur", 2, 36.0, 21.0),
            blur_run("blur_skd", 1, 38.5, 24.0), blur_run("blur_skd", 2, 37.0, 20.0),
            blur_run("blur_skd", 3, 30.0, 10.0), blur_run("original", 1, 40.0, 20.0)]
    matched, verdicts = compare_blur.matched_comparisons(runs)
    skd_vs_kd = verdicts["blur_skd-vs-blur_kd_deblur"]
    assert skd_vs_kd["AP_blur_mean"]["per_seed"] == [2.0, -1.0] and skd_vs_kd["AP_blur_mean"]["diff"] == 0.5
    assert skd_vs_kd["AP_sharp"]["per_seed"] == [0.5, 1.0] and not skd_vs_kd["AP_blur_mean"]["resolved"]
    assert "| blur_skd | blur_kd_deblur |" in matched and "| +2.0 / -1.0 |" in matched
    assert set(verdicts) == {"blur_skd-vs-blur_kd_deblur"}  # no other pair was run
    # the select split: its own keys; the design with the best blurred mean there is chosen
    select = [blur_run("blur_skd", 1, 38.0, 21.0, "select_"), blur_run("skd_base", 1, 30.0, 15.0, "select_"),
              blur_run("skd_ema_teacher", 1, 35.0, 22.5, "select_")]
    assert compare_blur.design_choice(runs + select, ["blur_skd", "skd_base", "skd_ema_teacher"]) == \
        ("skd_ema_teacher", 22.5, 21.0)
    # means over the given seeds only: blur_skd's seed 2 (select 25.0) does not count against seed 1's ablations
    select2 = [*select, blur_run("blur_skd", 2, 40.0, 25.0, "select_")]
    assert compare_blur.design_choice(runs + select2, ["blur_skd", "skd_ema_teacher"]) == ("blur_skd", 23.0, 23.0)
    assert compare_blur.design_choice(runs + select2, ["blur_skd", "skd_ema_teacher"], seeds=[1]) == \
        ("skd_ema_teacher", 22.5, 21.0)
    table = compare_blur.summarise(runs + select, ["blur_skd", "skd_base"], split="select", control_row="blur_skd")
    assert "| skd_base | 1 | 30.0 | 15.0 | 15.0 | 15.0 | 15.0 | 15.0 | 15.0 | -8.0" in table
    # an ablation that is the configs' design (blur_skd shares its runs) gets no difference to itself
    shared = [{**r, "same_runs_as": "skd_base"} for r in select if r["row"] == "blur_skd"]
    shared.append({**blur_run("skd_base", 1, 38.0, 21.0, "select_"), "same_runs_as": "skd_base"})
    table = compare_blur.summarise(shared, ["blur_skd", "skd_base"], split="select", control_row="blur_skd")
    assert "| skd_base | 1 | 38.0 | 21.0 | 21.0 | 21.0 | 21.0 | 21.0 | 21.0 | same runs as blur_skd | same runs as blur_skd |" in table
    # a row evaluated on val only has no select cells, so it is not in the select table
    assert "blur_kd_deblur" not in table
    # evaluation logs: the select split's sets give select_* keys
    log = "".join(f"Evaluation results for {name} in csv format:\n...\ncopypaste: {10.0 + i},{20.0 + i},1,2,3,4\n"
                  for i, name in enumerate(compare_blur.test_sets("select")))
    parsed = compare_blur.parse_eval_log(log, "eval_select.log", "select")
    assert parsed["select_AP_sharp"] == 10.0 and parsed["select_AP50_blur5"] == 25.0
    assert parsed["select_AP_blur_mean"] == 13.0 and not any(k.startswith("AP") for k in parsed)
    assert compare_blur.test_sets("val")[0] == "demo_shapes_val" and compare_blur.test_sets("select")[3] == "demo_shapes_select_blur3"
    plan = compare_blur.row_runs(compare_blur.ROWS)
    owner = {row: p[2] for row, p in plan.items()}
    assert owner["skd_ema_teacher"] == "skd_ema_teacher" and owner["skd_base"] == "skd_base"
    settings = compare_blur.skd_settings("blur_skd")
    same = [r for r in compare_blur.SKD_ABLATIONS if compare_blur.skd_settings(r) == settings]
    assert owner["blur_skd"] == (same[0] if same else "blur_skd")



def test_compare_blur_converged_teacher_schedule():
    """tools/compare_blur.py: the converged sharp teacher's last quarter runs at 1/100 of the LR
    (both drops before 3/4 of the run), and its 3/4 checkpoint is one the run saves."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import compare_blur

    # a single seed's difference has no interval: the cell says so instead of printing an infinite one
    cell, verdict = compare_blur.paired_cell([0.7])
    assert cell == "+0.7 (one seed: no interval)" and not verdict["resolved"]
    assert compare_blur.paired_cell([1.0, 1.2])[0] == "+1.1 (-0.2 to +2.4), unresolved"
    schedule = dict(zip(compare_blur.TEACHER_SHARP[::2], compare_blur.TEACHER_SHARP[1::2]))
    iters, period = schedule["SOLVER.MAX_ITER"], schedule["SOLVER.CHECKPOINT_PERIOD"]
    steps = [int(x) for x in schedule["SOLVER.STEPS"].strip("()").split(",") if x.strip()]
    assert iters == compare_blur.TEACHER_SHARP_ITERS == 960 and steps == [480, 640]
    assert max(steps) <= 3 * iters // 4
    assert (3 * iters // 4) % period == 0  # Detectron2 saves model_{k*period-1:07d}.pth


def test_compare_adv_reads_the_three_evaluations(tmp_path):
    """tools/compare_adv.py: clean, single-step (``_adv``) and PGD (``_pgd``) AP from the last
    evaluation row of metrics.json; a run without the PGD evaluation is refused."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import compare_adv

    row = {f"demo_shapes_val{suffix}/bbox/{m}": value + (m == "AP50")
           for suffix, value in (("", 40.0), ("_adv", 30.0), ("_pgd", 20.0)) for m in ("AP", "AP50")}
    (tmp_path / "metrics.json").write_text(json.dumps({"iteration": 0, "total_loss": 1.0}) + "\n"
                                           + json.dumps(row) + "\n")
    assert compare_adv.test_metrics(str(tmp_path)) == {
        "AP_clean": 40.0, "AP50_clean": 41.0, "AP_adv": 30.0, "AP50_adv": 31.0, "AP_pgd": 20.0, "AP50_pgd": 21.0}
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps({k: v for k, v in row.items() if "_pgd" not in k}) + "\n")
    with pytest.raises(RuntimeError, match="demo_shapes_val_pgd"):
        compare_adv.test_metrics(str(old))


def test_compare_wsod_metrics_and_table_hand_worked(tmp_path):
    """tools/compare_wsod.py: the final evaluation read from metrics.json, the differences to OICR
    and of each SD row to its SLV row, paired by seed."""
    import json

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import compare_wsod

    val, train = compare_wsod.TEST_SETS
    rows = [{"iteration": 9, "total_loss": 1.0},
            {"iteration": 19, f"{val}/wsod/mAP50": 50.0, f"{val}/wsod/CorLoc": 60.0,
             f"{train}/wsod/mAP50": 55.0, f"{train}/wsod/CorLoc": 70.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows))
    assert compare_wsod.test_metrics(str(tmp_path)) == {
        "mAP50": 50.0, "CorLoc": 70.0, "mAP50_train": 55.0, "CorLoc_val": 60.0}
    runs = [{"row": r, "seed": s, "mAP50": m, "CorLoc": c, "train_minutes": 2.0}
            for r, s, m, c in [("oicr", 1, 50.0, 70.0), ("oicr", 2, 52.0, 72.0),
                               ("slv_threshold", 1, 53.0, 71.0), ("slv_threshold", 2, 55.0, 73.0),
                               ("slv_sd_threshold", 1, 54.0, 74.0), ("slv_sd_threshold", 2, 57.0, 75.0)]]
    table, verdicts = compare_wsod.summarise(runs, ["oicr", "slv_threshold", "slv_sd_threshold"])
    assert verdicts["slv_threshold"]["mAP50_vs_oicr"]["ci"] == [3.0, 3.0]
    assert verdicts["slv_sd_threshold"]["mAP50_vs_slv_threshold"]["diff"] == 1.5
    assert not verdicts["slv_sd_threshold"]["mAP50_vs_slv_threshold"]["resolved"]
    assert "| slv_threshold | 2 | 54.0 (53.0-55.0) | 72.0 (71.0-73.0) | +3.0 (+3.0 to +3.0) |" in table
    # the matched table: SD vs its SLV row per seed (+1.0, +2.0 mAP50; +3.0, +2.0 CorLoc); the
    # oicr_reg pairs are absent (no oicr_reg run)
    matched, mv = compare_wsod.matched_table(runs, compare_wsod.MATCHED, (("mAP50", "mAP50"), ("CorLoc", "CorLoc")))
    assert set(mv) == {"slv_sd_threshold-vs-slv_threshold"}
    assert mv["slv_sd_threshold-vs-slv_threshold"]["mAP50"]["per_seed"] == [1.0, 2.0]
    assert mv["slv_sd_threshold-vs-slv_threshold"]["CorLoc"]["per_seed"] == [3.0, 2.0]
    assert "| +1.0 / +2.0 | +1.5 (-4.9 to +7.9), unresolved | +3.0 / +2.0 |" in matched


def test_lgd_attention_probe_reports_own_label_weight(tmp_path):
    cfg = load_cfg(DEMO_LGD, *TINY)
    torch.manual_seed(0)
    ckpt = tmp_path / "lgd.pth"
    torch.save({"model": build_model(cfg).state_dict()}, ckpt)
    out = tmp_path / "probe.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "lgd_attention_probe.py"), "--config-file", DEMO_LGD,
         "--weights", str(ckpt), "--images", "3", "--json", str(out), "MODEL.DEVICE", "cpu", *TINY],
        cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert sorted(report) == [f"p{i}" for i in range(2, 7)]
    for r in report.values():
        assert r["objects"] > 0 and 0 < r["uniform"] <= 0.5 and 0 <= r["own"] <= 1
    assert "own-label attention weight vs 1/N" in proc.stdout


def test_blur_eval_variants_batch_statistics_switch():
    """tools/blur_eval_variants.py: inside ``deblur_batch_stats`` the deblurring blocks' BatchNorm
    normalises by the batch's own statistics even in eval mode (which Detectron2's inference sets),
    and its running averages are back afterwards; other BatchNorm layers are untouched."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    from blur_eval_variants import deblur_batch_stats

    model = torch.nn.Module()
    model.backbone = torch.nn.Module()
    model.backbone.deblur = torch.nn.ModuleDict({"p2": torch.nn.BatchNorm2d(3)})
    model.backbone.other = torch.nn.BatchNorm2d(3)
    for bn in (model.backbone.deblur["p2"], model.backbone.other):
        bn.running_mean.fill_(5.0)
    model.eval()
    x = torch.randn(2, 3, 4, 6) * 2 + 1
    before = model.backbone.deblur["p2"](x)
    with deblur_batch_stats(model) as count:
        during = model.backbone.deblur["p2"](x)
        other = model.backbone.other(x)
    assert count == 1
    expected = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(during, expected, atol=1e-5)
    assert torch.allclose(other, (x - 5.0) / (1 + 1e-5) ** 0.5, atol=1e-5)  # running averages
    assert torch.equal(model.backbone.deblur["p2"](x), before)
    assert torch.equal(model.backbone.deblur["p2"].running_mean, torch.full((3,), 5.0))
