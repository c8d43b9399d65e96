"""FGFI: imitation mask, frozen hidden teacher, adapters, warm-up, empty images, load errors,
student-only eval."""
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from common import REPO, assert_same_detections, instances, load_cfg, tiny_batch
from lgd_detectron2.engine.trainer import DistillTrainLoop, build_optimizer
from lgd_detectron2.export import student_weights
from lgd_detectron2.fgfi import TeacherLoadError, imitation_masks, masked_imitation_loss

DEMO_FGFI = "configs/Demo/faster_rcnn_R_18_FPN_fgfi.yaml"
TEACHER_CFG = f"{REPO}/configs/Demo/faster_rcnn_R_34_FPN_teacher.yaml"


def fgfi_cfg(*opts):
    return load_cfg(
        DEMO_FGFI, "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.FGFI.TEACHER.ALLOW_RANDOM_INIT", True,
        "MODEL.FGFI.WARMUP_ITERS", 5, *opts,
    )


def test_imitation_mask_hand_computed():
    # level 0: 2x2 grid, one 10x10 anchor per cell; level 1: 1x1 grid, one 20x20 anchor
    level0 = Boxes(torch.tensor([[0.0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [10, 10, 20, 20]]))
    level1 = Boxes(torch.tensor([[0.0, 0, 20, 20]]))
    gts = [
        instances([[0, 0, 10, 10]], [0], (20, 20)),   # IoU 1 with cell (0,0) on level 0, 0.25 on level 1
        instances([[5, 5, 15, 15]], [1], (20, 20)),   # IoU 25/175 = 0.143 with each level-0 cell, 0.25 level 1
        instances([], [], (20, 20)),                  # no objects
    ]
    m0, m1 = imitation_masks([level0, level1], [(2, 2), (1, 1)], gts, psi=0.5, level_assignment="all")
    # image 0: best IoU 1 -> threshold 0.5: only cell (0,0) of level 0
    assert m0[0].tolist() == [[True, False], [False, False]] and not m1[0].any()
    # image 1: best IoU 0.25 (level 1) -> threshold 0.125: all level-0 cells and level 1
    assert m0[1].all() and m1[1].all()
    assert not m0[2].any() and not m1[2].any()
    # per-level maxima: image 0 now also marks level 1 (0.25 > 0.5 * 0.25)
    p0, p1 = imitation_masks([level0, level1], [(2, 2), (1, 1)], gts, psi=0.5, level_assignment="per_level")
    assert p0[0].tolist() == [[True, False], [False, False]] and p1[0].all()
    # psi close to 1: only the best anchors
    q0, q1 = imitation_masks([level0, level1], [(2, 2), (1, 1)], gts, psi=0.99)
    assert q0[1].sum() == 0 and q1[1].all()


def test_masked_loss_normalisation_and_empty():
    s = [torch.ones(2, 3, 2, 2)]
    t = [torch.zeros(2, 3, 2, 2)]
    m = [torch.zeros(2, 2, 2, dtype=torch.bool)]
    loss, n = masked_imitation_loss(s, t, m)
    assert loss.item() == 0.0 and n == 0
    m[0][0, 0, 0] = m[0][1, 1, 1] = True
    loss, n = masked_imitation_loss(s, t, m)
    assert n == 2 and loss.item() == pytest.approx((3 + 3) / (2 * 2))


def _step(loop, it):
    with EventStorage(it) as storage:
        loop.iter, loop.storage = it, storage
        loop.run_step()


def test_teacher_is_frozen_hidden_and_in_eval_mode():
    cfg = fgfi_cfg()
    model = build_model(cfg)
    teacher = model.distiller.teacher
    assert not any(k.startswith("distiller.teacher") for k in model.state_dict())
    assert all(not k.startswith("distiller.teacher") for k, _ in model.named_parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model.train()
    assert not teacher.training
    optimizer = build_optimizer(cfg, model)
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in ids for p in teacher.parameters())
    adapters = {k: v.clone() for k, v in model.distiller.adapters.state_dict().items()}
    loop = DistillTrainLoop(model, [tiny_batch()] * 10, optimizer)
    for it in range(5, 8):
        _step(loop, it)
    assert not teacher.training
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BN running stats
    changed = model.distiller.adapters.state_dict()
    assert any(not torch.equal(adapters[k], changed[k]) for k in adapters)


def test_adapters_get_gradients_and_warmup_switches_loss():
    cfg = fgfi_cfg()
    model = build_model(cfg).train()
    assert set(model.distiller.adapters) == {"p2", "p3", "p4", "p5", "p6"}
    assert model.distiller.adapters["p2"].weight.shape == (64, 32, 3, 3)  # student 32 -> teacher 64
    batch = tiny_batch()
    for it, on in ((0, False), (4, False), (5, True), (50, True)):
        with EventStorage(it):
            losses = model(batch)
        loss = losses["loss_fgfi_imitation"]
        assert torch.isfinite(loss)
        assert (loss.item() > 0) == on, it
        if on:
            adapter_params = list(model.distiller.adapters.parameters())
            grads = torch.autograd.grad(loss, adapter_params + list(model.backbone.parameters()),
                                        allow_unused=True)
            # every adapter is in the graph (DDP); those of levels with positives learn
            assert all(g is not None for g in grads[: len(adapter_params)])
            assert grads[0].abs().sum() > 0  # p2 weight
            assert sum(g.abs().sum() for g in grads[len(adapter_params):] if g is not None) > 0


def test_images_without_objects_give_zero_imitation_loss():
    model = build_model(fgfi_cfg()).train()
    with EventStorage(50):
        losses = model(tiny_batch(empty=(0, 1)))
    assert losses["loss_fgfi_imitation"].item() == 0.0
    assert all(torch.isfinite(v) for v in losses.values())


def test_teacher_load_errors(tmp_path):
    with pytest.raises(TeacherLoadError, match="no such file"):
        build_model(fgfi_cfg("MODEL.FGFI.TEACHER.ALLOW_RANDOM_INIT", False,
                             "MODEL.FGFI.TEACHER.WEIGHTS", str(tmp_path / "missing.pth")))
    junk = tmp_path / "junk.pth"
    torch.save({"model": {"something.else": torch.zeros(3)}}, junk)
    with pytest.raises(TeacherLoadError, match=r"do not fit.*'backbone\.\*' tensor must load"):
        build_model(fgfi_cfg("MODEL.FGFI.TEACHER.ALLOW_RANDOM_INIT", False,
                             "MODEL.FGFI.TEACHER.WEIGHTS", str(junk)))
    with pytest.raises(TeacherLoadError, match="WEIGHTS is empty"):
        build_model(fgfi_cfg("MODEL.FGFI.TEACHER.ALLOW_RANDOM_INIT", False, "MODEL.FGFI.TEACHER.WEIGHTS", ""))
    with pytest.raises(TeacherLoadError, match="teacher has 3 classes.*student 5"):
        build_model(fgfi_cfg("MODEL.ROI_HEADS.NUM_CLASSES", 5))
    strided = tmp_path / "teacher_dilated.yaml"
    strided.write_text(  # a teacher pyramid without p2
        f'_BASE_: "{TEACHER_CFG}"\nMODEL:\n  RESNETS:\n    OUT_FEATURES: ["res3", "res4", "res5"]\n'
        '  FPN:\n    IN_FEATURES: ["res3", "res4", "res5"]\n'
        '  RPN:\n    IN_FEATURES: ["p3", "p4", "p5", "p6"]\n'
        '  ROI_HEADS:\n    IN_FEATURES: ["p3", "p4", "p5"]\n'
        '  ANCHOR_GENERATOR:\n    SIZES: [[32], [64], [128], [256]]\n')
    with pytest.raises(TeacherLoadError, match="does not match the student"):
        build_model(fgfi_cfg("MODEL.FGFI.TEACHER.CONFIG_FILE", str(strided)))
    not_detector = tmp_path / "segmentor.yaml"
    not_detector.write_text(f'_BASE_: "{TEACHER_CFG}"\nMODEL:\n  META_ARCHITECTURE: "SemanticSegmentor"\n')
    with pytest.raises(TeacherLoadError, match="builds SemanticSegmentor, not a detector"):
        build_model(fgfi_cfg("MODEL.FGFI.TEACHER.CONFIG_FILE", str(not_detector)))


def test_teacher_loads_trained_weights_and_counts_them(tmp_path, caplog):
    tcfg = load_cfg(TEACHER_CFG)
    torch.manual_seed(5)
    teacher = build_model(tcfg)
    path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict(), "iteration": 3}, path)
    with caplog.at_level("INFO"):
        model = build_model(fgfi_cfg("MODEL.FGFI.TEACHER.ALLOW_RANDOM_INIT", False,
                                     "MODEL.FGFI.TEACHER.WEIGHTS", str(path)))
    loaded = model.distiller.teacher.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in teacher.state_dict().items())
    n = len(teacher.state_dict())
    assert f"{n}/{n} tensors" in caplog.text


def test_teacher_partial_or_misshaped_weights_fail_naming_the_tensors(tmp_path):
    """Only some backbone tensors in the file, or one with another shape: an error naming them
    (the old loader took whatever matched). Head tensors may be missing: FGFI reads the backbone."""
    torch.manual_seed(5)
    weights = build_model(load_cfg(TEACHER_CFG)).state_dict()
    cfg_opts = ("MODEL.FGFI.TEACHER.ALLOW_RANDOM_INIT", False)
    partial = {k: v for k, v in weights.items() if "res5" not in k}
    torch.save({"model": partial}, tmp_path / "partial.pth")
    with pytest.raises(TeacherLoadError, match=r"missing \(backbone\.bottom_up\.res5\."):
        build_model(fgfi_cfg(*cfg_opts, "MODEL.FGFI.TEACHER.WEIGHTS", str(tmp_path / "partial.pth")))
    reshaped = dict(weights)
    reshaped["backbone.fpn_output2.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save({"model": reshaped}, tmp_path / "reshaped.pth")
    with pytest.raises(TeacherLoadError, match=r"1 with another shape \(backbone\.fpn_output2\.weight"):
        build_model(fgfi_cfg(*cfg_opts, "MODEL.FGFI.TEACHER.WEIGHTS", str(tmp_path / "reshaped.pth")))
    backbone_only = {k: v for k, v in weights.items() if k.startswith("backbone.")}
    torch.save({"model": backbone_only}, tmp_path / "backbone.pth")
    model = build_model(fgfi_cfg(*cfg_opts, "MODEL.FGFI.TEACHER.WEIGHTS", str(tmp_path / "backbone.pth")))
    loaded = model.distiller.teacher.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in backbone_only.items())


def test_teacher_with_the_other_colour_order_sees_flipped_channels(tmp_path):
    """A BGR teacher of an RGB student gets the student's images with channels reversed (and
    normalises them with its own PIXEL_MEAN/STD); an unconvertible format fails."""
    rgb = tmp_path / "teacher_rgb.yaml"
    rgb.write_text(f'_BASE_: "{TEACHER_CFG}"\nINPUT:\n  FORMAT: "RGB"\n')
    model = build_model(fgfi_cfg("MODEL.FGFI.TEACHER.CONFIG_FILE", str(rgb))).train()
    assert model.distiller.flip_channels
    seen = []
    model.distiller.teacher.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    batch = tiny_batch()
    with EventStorage(50):
        model(batch)
    teacher = model.distiller.teacher
    expected = teacher.preprocess_image([{"image": x["image"].flip(0)} for x in batch]).tensor
    torch.testing.assert_close(seen[0], expected)
    gray = tmp_path / "teacher_l.yaml"
    gray.write_text(f'_BASE_: "{TEACHER_CFG}"\nINPUT:\n  FORMAT: "L"\n')
    with pytest.raises(TeacherLoadError, match="INPUT.FORMAT 'L' cannot be made from the student's 'BGR'"):
        build_model(fgfi_cfg("MODEL.FGFI.TEACHER.CONFIG_FILE", str(gray)))


def test_eval_is_the_plain_student():
    cfg = fgfi_cfg("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)
    model = build_model(cfg).eval()
    base_cfg = cfg.clone()
    base_cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    plain = build_model(base_cfg).eval()
    result = plain.load_state_dict(student_weights(model.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    inputs = [{k: v for k, v in x.items() if k != "instances"} for x in tiny_batch(seed=4)]
    with torch.no_grad():
        a, b = model(inputs), plain(inputs)
    assert_same_detections(a, b)


def test_loss_scale_tool_gives_half_the_teachers_squared_norm_at_imitated_cells():
    """tools/fgfi_loss_scale.py: with zero adapters the unweighted loss is
    sum over imitated cells of ||t||^2 / (2 N_p), computed here from the teacher directly."""
    import os
    import sys

    sys.path.insert(0, os.path.join(REPO, "tools"))
    from fgfi_loss_scale import starting_imitation_loss

    cfg = fgfi_cfg()
    model = build_model(cfg).train()
    batch = tiny_batch()
    raw = starting_imitation_loss(model, batch, cfg.MODEL.FGFI.LOSS_WEIGHT, 5)

    distiller, teacher = model.distiller, model.distiller.teacher
    with torch.no_grad():
        student = model.backbone(model.preprocess_image(batch).tensor)
        t = teacher.backbone(teacher.preprocess_image(batch).tensor)
        levels = distiller.levels
        anchors = model.proposal_generator.anchor_generator([student[l] for l in levels])
        masks = imitation_masks(anchors, [student[l].shape[-2:] for l in levels],
                                [x["instances"] for x in batch], cfg.MODEL.FGFI.PSI)
    squared = sum((t[l].pow(2).sum(1) * m).sum() for l, m in zip(levels, masks))
    positives = sum(m.sum() for m in masks)
    assert positives > 0
    assert raw == pytest.approx((squared / (2 * positives)).item(), rel=1e-5)


def test_teacher_from_its_runs_dumped_config(tmp_path):
    """tools/compare.py hands FGFI its teacher as trained: the run's own config.yaml (what
    train_net.py writes). A FrozenBN R-34 teacher comes back FrozenBN, with its weights."""
    import os
    import sys

    from detectron2.layers import FrozenBatchNorm2d

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import compare

    tcfg = load_cfg(TEACHER_CFG, "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.BACKBONE.FREEZE_AT", 2)
    run_dir = tmp_path / "teacher_seed1"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(tcfg.dump())
    torch.manual_seed(7)
    teacher = build_model(tcfg)
    torch.save({"model": teacher.state_dict()}, run_dir / "model_final.pth")
    model = build_model(fgfi_cfg("MODEL.FGFI.TEACHER.ALLOW_RANDOM_INIT", False,
                                 *compare.fgfi_student_opts(str(run_dir))))
    loaded = model.distiller.teacher
    assert isinstance(loaded.backbone.bottom_up.stem.conv1.norm, FrozenBatchNorm2d)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in teacher.state_dict().items())


def test_fgfi_teacher_recipe_of_each_protocol():
    """The teacher run: the protocol's overrides, twice the iterations, LR step at 3/4 of them;
    on the pretrained protocol its own R-34 body replaces the students' R-18 one (the later
    MODEL.WEIGHTS wins in merge_from_list), and the caller's overrides come last."""
    import os
    import sys

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import compare

    p = compare.PROTOCOLS["pretrained"]
    common = (*p.overrides, "MODEL.WEIGHTS", "r18.pth")
    opts = compare.fgfi_teacher_opts(p, common, ("MODEL.DEVICE", "cpu"), teacher_body="r34.pth")
    cfg = load_cfg(TEACHER_CFG, *opts)
    assert cfg.MODEL.WEIGHTS == "r34.pth" and cfg.MODEL.RESNETS.DEPTH == 34
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "value"
    assert cfg.SOLVER.MAX_ITER == 2 * p.max_iter and cfg.SOLVER.STEPS == (round(1.5 * p.max_iter),)
    assert cfg.SOLVER.CHECKPOINT_PERIOD == 2 * p.max_iter and cfg.TEST.EVAL_PERIOD == 0
    assert opts[-2:] == ("MODEL.DEVICE", "cpu")
    scratch = load_cfg(TEACHER_CFG, *compare.fgfi_teacher_opts(compare.PROTOCOLS["scratch"],
                                                               compare.PROTOCOLS["scratch"].overrides))
    assert scratch.MODEL.WEIGHTS == "" and scratch.SOLVER.MAX_ITER == 1600 and scratch.MODEL.RESNETS.NORM == "BN"
