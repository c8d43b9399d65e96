"""Every YAML under configs/ loads (with our keys), validates and builds a model on CPU."""
import glob
import os

import pytest
import torch

from detectron2.modeling import build_model

from detectron2.utils.events import EventStorage

from common import REPO, load_cfg, paired, tiny_batch
from lgd_detectron2.compat import has_native_ops
from lgd_detectron2.config import validate_config

CONFIGS = sorted(
    os.path.relpath(p, REPO)
    for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
)


def test_configs_found():
    assert len(CONFIGS) >= 6


def _deformable(cfg):
    """Does the config (or its FGFI teacher's config) use deformable convolution?"""
    cfgs = [cfg]
    teacher = cfg.MODEL.FGFI.TEACHER.CONFIG_FILE
    if cfg.MODEL.META_ARCHITECTURE.startswith("Distill") and cfg.MODEL.DISTILL.METHOD == "FGFI" and teacher:
        cfgs.append(load_cfg(teacher))
    return any(any(c.MODEL.RESNETS.DEFORM_ON_PER_STAGE) for c in cfgs)


def _refused_without_native_ops(cfg):
    """On the PyPI route (no detectron2._C), or on CPU (Detectron2's deformable convolution is
    CUDA-only), a deformable config, or one whose teacher is, stops before anything is built,
    naming the key; True if it did (nothing more to test)."""
    if not _deformable(cfg) or (has_native_ops() and cfg.MODEL.DEVICE.startswith("cuda")):
        return False
    reason = "C\\+\\+ ops" if not has_native_ops() else "CUDA only"
    with pytest.raises(ValueError, match=f"DEFORM_ON_PER_STAGE.*{reason}"):
        validate_config(cfg)
        build_model(cfg)
    return True


def test_survey_table_fgfi_teachers():
    """The LGD paper's FGFI pairings: R-101 teachers for R-50 students, R-101-DCN for R-101."""
    for student, teacher in [
        ("faster_rcnn_R_50_FPN_2x_fgfi", "faster_rcnn_R_101_FPN_2x_baseline"),
        ("faster_rcnn_R_101_FPN_2x_fgfi", "faster_rcnn_R_101_DCN_FPN_2x_baseline"),
        ("retinanet_R_50_FPN_2x_fgfi", "retinanet_R_101_FPN_2x_baseline"),
        ("retinanet_R_101_FPN_2x_fgfi", "retinanet_R_101_DCN_FPN_2x_baseline"),
    ]:
        cfg = load_cfg(f"configs/COCO-Detection/{student}.yaml")
        assert cfg.MODEL.FGFI.TEACHER.CONFIG_FILE == f"configs/COCO-Detection/{teacher}.yaml"
        t = load_cfg(cfg.MODEL.FGFI.TEACHER.CONFIG_FILE)
        assert t.MODEL.RESNETS.DEPTH == 101 and cfg.MODEL.RESNETS.DEPTH == (101 if "101" in student else 50)
        assert list(t.MODEL.RESNETS.DEFORM_ON_PER_STAGE) == ([False, True, True, True] if "DCN" in teacher else [False] * 4)


@pytest.mark.skipif(not has_native_ops(), reason="deformable convolution needs detectron2._C (upstream route)")
@pytest.mark.parametrize("name", ["faster_rcnn_R_101_DCN_FPN_2x_baseline", "retinanet_R_101_DCN_FPN_2x_baseline"])
def test_deformable_teacher_builds_with_native_ops(name):
    """On the upstream route the DCN teachers build (CPU can build the modules; only running them
    needs CUDA): modulated deformable convolution in every bottleneck of res3-res5, none in res2."""
    from detectron2.layers import ModulatedDeformConv

    cfg = load_cfg(f"configs/COCO-Detection/{name}.yaml")
    model = build_model(cfg)  # Detectron2's own builder: our CUDA check is not in the way
    deformable = [n for n, m in model.named_modules() if isinstance(m, ModulatedDeformConv)]
    assert len(deformable) == 4 + 23 + 3  # 4, 23 and 3 bottleneck blocks in res3, res4, res5
    assert all(".res2." not in n and n.endswith("conv2") for n in deformable)


@pytest.mark.parametrize("path", CONFIGS)
def test_config_builds_without_weights(path):
    cfg = load_cfg(path, "MODEL.FGFI.TEACHER.ALLOW_RANDOM_INIT", True,
                   "MODEL.BLUR_SKD.FROZEN_TEACHER.ALLOW_RANDOM_INIT", True,
                   "MODEL.UDFA.TEACHER.ALLOW_RANDOM_INIT", True)
    if _refused_without_native_ops(cfg):
        return
    validate_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n > 1e6
    # UDFA's protocol: from a trained baseline (the WSOD demo starts from its own pretraining)
    fine_tuning = cfg.MODEL.WEIGHTS.startswith("output/") and "wsod" not in path
    if fine_tuning:
        baseline = "output/" + ("demo/" if "Demo" in path else "") + os.path.basename(path).split("_R_")[0]
        assert cfg.MODEL.WEIGHTS.startswith(baseline) and cfg.MODEL.WEIGHTS.endswith("baseline/model_final.pth")
        if cfg.MODEL.DISTILL.METHOD == "UDFA" and cfg.MODEL.UDFA.KDFA_WEIGHT > 0:
            assert cfg.MODEL.UDFA.TEACHER.WEIGHTS == cfg.MODEL.WEIGHTS  # the teacher is the start
        if "COCO-Detection" in path:  # a 1x fine-tuning
            assert cfg.SOLVER.MAX_ITER == 90000 and tuple(cfg.SOLVER.STEPS) == (60000, 80000)
            assert (cfg.MODEL.UDFA.FG_WEIGHT, cfg.MODEL.UDFA.BG_WEIGHT) == (5.0, 30.0)
        else:
            assert cfg.SOLVER.MAX_ITER == 200 and cfg.MODEL.RESNETS.NORM == "BN"
    elif "COCO-Detection" in path:
        assert cfg.MODEL.WEIGHTS.startswith("detectron2://ImageNetPretrained/MSRA/R-")
        assert cfg.SOLVER.MAX_ITER == 180000 and tuple(cfg.SOLVER.STEPS) == (120000, 160000)
        one_stage = "retinanet" in path or "fcos" in path  # released LR: 0.01 one-stage, 0.02 R-CNN
        assert cfg.SOLVER.BASE_LR == (0.01 if one_stage else 0.02) and cfg.SOLVER.IMS_PER_BATCH == 16
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (640, 672, 704, 736, 768, 800)
        if "fcos" in path:  # the released cvpods recipe's test thresholds, not v0.6's 0.2
            f = cfg.MODEL.FCOS
            assert (f.SCORE_THRESH_TEST, f.TOPK_CANDIDATES_TEST, f.NMS_THRESH_TEST) == (0.05, 1000, 0.6)
            assert cfg.TEST.DETECTIONS_PER_IMAGE == 100
    elif "PascalVOC-WSOD" in path:  # weakly supervised VOC07: pretrained C4 body, 20 classes
        assert cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
        assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 20 and cfg.DATASETS.TRAIN == ("voc_2007_trainval_weak",)
        assert cfg.MODEL.WSOD.SLV.ENABLED == ("slv" in path) and cfg.MODEL.WSOD.SD.ENABLED == ("_sd_" in path)
    elif "Demo/wsod_" in path and "pretrain" not in path:  # from the classification pretraining
        assert cfg.MODEL.WEIGHTS == "output/demo/wsod_R_18_pretrain/model_final.pth"
        assert cfg.DATASETS.TRAIN == ("demo_shapes_train_weak",)
    else:
        assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.RESNETS.NORM == "BN"


def test_unknown_key_is_named(tmp_path):
    # command-line override (yacs raises AssertionError) and YAML file (KeyError)
    with pytest.raises((KeyError, AssertionError), match="MODEL.LGD.LAMDA"):
        load_cfg("configs/Demo/faster_rcnn_R_18_FPN_lgd.yaml", "MODEL.LGD.LAMDA", 1.0)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{REPO}/configs/Demo/faster_rcnn_R_18_FPN_lgd.yaml"\n'
                   "MODEL:\n  FGFI:\n    PSY: 0.5\n")
    with pytest.raises(KeyError, match="MODEL.FGFI.PSY"):
        load_cfg(str(bad))


@pytest.mark.parametrize(
    "opts, message",
    [
        (("MODEL.LGD.PRE_NONDISTILL_ITERS", -1), "PRE_NONDISTILL_ITERS"),
        (("MODEL.FGFI.PSI", 0.0), "PSI"),
        (("MODEL.FGFI.PSI", 1.5), "PSI"),
        (("SOLVER.MAX_ITER", 0), "MAX_ITER"),
        (("MODEL.LGD.NUM_HEADS", 7), "NUM_HEADS"),
    ],
)
def test_impossible_values_fail_with_the_key_named(opts, message):
    cfg = load_cfg("configs/Demo/faster_rcnn_R_18_FPN_lgd.yaml", *opts)
    with pytest.raises(ValueError, match=message):
        validate_config(cfg)


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if "COCO" in p and ("lgd" in p or "fgfi" in p or "blur" in p or "udfa" in p
                                                   or "faster" not in p)]
)
def test_coco_config_runs_a_training_step(path):
    """Every distillation config, and the baselines of the families beyond Faster R-CNN."""
    # random init, small input; trainable BN (frozen BN from random init is not meaningful)
    cfg = load_cfg(path, "MODEL.FGFI.TEACHER.ALLOW_RANDOM_INIT", True, "MODEL.RESNETS.NORM", "BN",
                   "MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.UDFA.TEACHER.ALLOW_RANDOM_INIT", True)
    cfg.MODEL.FGFI.TEACHER.CONFIG_FILE = _teacher_with_classes(cfg.MODEL.FGFI.TEACHER.CONFIG_FILE, 3)
    if _refused_without_native_ops(cfg):
        return
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = tiny_batch(masks=cfg.MODEL.MASK_ON)
    if cfg.INPUT.BLUR.MODE == "paired":
        batch = paired(batch)
    with EventStorage(cfg.MODEL.LGD.PRE_NONDISTILL_ITERS + cfg.MODEL.FGFI.WARMUP_ITERS):
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    distilled = "lgd" in path or "fgfi" in path or "blur" in path or "udfa" in path
    assert any(k in losses for k in ("loss_distill", "loss_fgfi_imitation", "loss_deblur_feature",
                                     "loss_udfa_kdfa")) == distilled
    assert ("loss_mask" in losses) == cfg.MODEL.MASK_ON
    sum(losses.values()).backward()


def _teacher_with_classes(config_file, num_classes):
    """The COCO teacher YAML with the test's class count (a temporary child config)."""
    import tempfile

    if not config_file:
        return config_file
    base = config_file if os.path.isabs(config_file) else os.path.join(REPO, config_file)
    fd, path = tempfile.mkstemp(suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(f'_BASE_: "{base}"\nMODEL:\n  RESNETS:\n    NORM: "BN"\n'
                f"  ROI_HEADS:\n    NUM_CLASSES: {num_classes}\n")
    return path
