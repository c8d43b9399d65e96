"""UDFA: the attack, fg/bg masks and the decoupled loss, where each term's gradient goes, the
views each term sees, the loss weights, the auxiliary BatchNorm (and the attack crafted through
it), export, the adversarial evaluations (``_adv``, ``_pgd``) and config errors."""
import math

import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from common import REPO, assert_export_matches_stock, instances, load_cfg, tiny_batch
from test_train_net import FAST, run_train_net
from lgd_detectron2.config import validate_config
from lgd_detectron2.engine.trainer import DistillTrainLoop, Trainer, build_optimizer
from lgd_detectron2.fgfi import TeacherLoadError
from lgd_detectron2.udfa import attack as udfa_attack
from lgd_detectron2.udfa import distiller as udfa_distiller
from lgd_detectron2.udfa.attack import (
    ATTACK_FLAG, ATTACK_SUFFIX, AttackingEvaluationModel, detection_losses, features_and_losses,
    losses_at_test_time, project, register_adversarial_names, signed_gradient_attack, with_images,
)
from lgd_detectron2.udfa.aux_bn import AuxiliaryBatchNormMixin, adversarial_bn
from lgd_detectron2.udfa.distiller import box_levels, decoupled_alignment, foreground_masks

DEMO_UDFA = "configs/Demo/faster_rcnn_R_18_FPN_udfa.yaml"
DEMO_RETINANET_UDFA = "configs/Demo/retinanet_R_18_FPN_udfa.yaml"
DEMO_BASELINE = "configs/Demo/faster_rcnn_R_18_FPN_baseline.yaml"


def udfa_cfg(*opts):
    return load_cfg(DEMO_UDFA, "MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
                    "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.UDFA.TEACHER.ALLOW_RANDOM_INIT", True, *opts)


def spy_on_attack(monkeypatch, module, attack=True):
    """Replace ``module.signed_gradient_attack`` by a wrapper that records its keywords, the seed
    it ran under and its result (without ``attack``: the images unchanged, no attack run); returns
    the list of records."""
    calls, real = [], module.signed_gradient_attack

    def spy(loss_of, originals, **kwargs):
        seed = torch.initial_seed()
        out = real(loss_of, originals, **kwargs) if attack else [o.detach().float() for o in originals]
        calls.append({"kwargs": kwargs, "seed": seed, "out": out})
        return out

    monkeypatch.setattr(module, "signed_gradient_attack", spy)
    return calls


def _seeded_loss(model, batch, seed=0):
    torch.manual_seed(seed)
    return sum(detection_losses(model, batch).values())


def test_attack_raises_the_loss_stays_in_the_ball_and_leaves_no_gradient():
    model = build_model(load_cfg(DEMO_BASELINE)).eval()
    batch = tiny_batch()
    originals = [x["image"] for x in batch]
    with losses_at_test_time(model):
        before = _seeded_loss(model, batch).item()
        for steps, eps in ((1, 8.0), (3, 4.0)):  # FGSM-like and a 3-step PGD
            adv = signed_gradient_attack(lambda ims: _seeded_loss(model, with_images(batch, ims)),
                                         originals, epsilon=eps, step_size=2.0, steps=steps)
            for a, o in zip(adv, originals):
                assert not a.requires_grad
                assert (a - o).abs().max() <= eps + 1e-4
                assert a.min() >= 0 and a.max() <= 255
                assert (a != o).float().mean() > 0.5  # the perturbation is not empty
            after = _seeded_loss(model, with_images(batch, adv)).item()
            assert after > before
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_random_start_and_step_clipping():
    originals = [torch.full((3, 4, 4), 254.0), torch.full((3, 4, 4), 1.0)]
    # gradient +1 everywhere: every step moves up by 2, clipped at eps 3 and at 255
    adv = signed_gradient_attack(lambda ims: sum(t.sum() for t in ims), originals, epsilon=3.0,
                                 step_size=2.0, steps=2)
    assert torch.all(adv[0] == 255) and torch.all(adv[1] == 4)
    torch.manual_seed(0)
    adv = signed_gradient_attack(lambda ims: -sum(t.sum() for t in ims), originals, epsilon=3.0,
                                 step_size=0.0, steps=1, random_start=True)
    assert (adv[1] - 1).abs().max() <= 1.5 and adv[1].min() >= 0 and len(adv[1].unique()) > 1


def test_box_levels_and_foreground_masks_hand_worked():
    boxes = torch.tensor([[2.0, 3, 22, 23], [0, 0, 120, 120], [0, 0, 300, 300], [40, 40, 40, 40]])
    # sides 20, 120, 300, 0 -> log2(side / 56) = -1.5, 1.1, 2.4, -inf -> levels 0, 1, 2 (clamped), 0
    assert box_levels(boxes, 3, 56.0).tolist() == [0, 1, 2, 0]
    gt = [instances(boxes[:2].tolist(), [0, 1], (64, 64)), instances(boxes[2:].tolist(), [2, 0], (64, 64))]
    masks = foreground_masks(gt, [(16, 16), (8, 8), (4, 4)], [4, 8, 16], 56.0)
    assert [tuple(m.shape) for m in masks] == [(2, 1, 16, 16), (2, 1, 8, 8), (2, 1, 4, 4)]
    expected = torch.zeros(2, 1, 16, 16)
    expected[0, 0, 0:6, 0:6] = 1  # x 2/4=0.5 -> cell 0 .. 22/4=5.5 -> cell 5; y 3/4 .. 23/4 likewise
    expected[1, 0, 10, 10] = 1  # a zero-size box still marks its cell
    assert torch.equal(masks[0], expected)
    assert masks[1][0].sum() == 64 and masks[1][1].sum() == 0  # 120 px box covers the 8x8 grid
    assert masks[2][1].sum() == 16 and masks[2][0].sum() == 0


def test_box_levels_and_masks_on_asymmetric_boxes_and_non_square_maps():
    """Wide and tall boxes on maps with H != W: any x/y swap (in the box coordinates, the cell
    ranges or the map's shape) moves or clips the painted cells."""
    wide = [6.0, 2, 30, 11]  # 24 x 9 px, side 14.7 -> log2(14.7 / 16) < 0 -> level 0
    long = [8.0, 16, 64, 40]  # 56 x 24 px, side 36.7 -> log2(2.29) = 1.2 -> level 1
    corner = [50.0, 30, 63, 39]  # 13 x 9 px near the right edge of a 64 x 40 image -> level 0
    flat = [0.0, 0, 120, 10]  # 120 x 10: side sqrt(1200) = 34.6 -> level 1 (not the long side's 2)
    assert box_levels(torch.tensor([wide, long, corner, flat]), 3, 16.0).tolist() == [0, 1, 0, 1]
    size = (40, 64)  # H, W
    gt = [instances([wide, long], [0, 1], size), instances([corner], [2], size)]
    masks = foreground_masks(gt, [(10, 16), (5, 8)], [4, 8], 16.0)
    assert [tuple(m.shape) for m in masks] == [(2, 1, 10, 16), (2, 1, 5, 8)]
    level0 = torch.zeros(2, 1, 10, 16)
    level0[0, 0, 0:3, 1:8] = 1  # wide: y 2/4 .. 11/4 -> rows 0-2; x 6/4 .. 30/4 -> columns 1-7
    level0[1, 0, 7:10, 12:16] = 1  # corner: y 30/4 .. 39/4 -> rows 7-9; x 50/4 .. 63/4 -> 12-15
    level1 = torch.zeros(2, 1, 5, 8)
    level1[0, 0, 2:5, 1:8] = 1  # long: y 16/8 .. 40/8 -> rows 2-4; x 8/8 .. 64/8 -> columns 1-7
    assert torch.equal(masks[0], level0) and torch.equal(masks[1], level1)


def test_decoupled_alignment_normalisation():
    mask = torch.zeros(1, 1, 2, 2)
    mask[0, 0, 0, 0] = 1
    target = torch.zeros(1, 3, 2, 2)
    student = torch.full((1, 3, 2, 2), 2.0)
    student[0, :, 0, 0] = 1.0  # error 1 on the fg cell, 2 on the 3 bg cells
    # fg: 3 * 1 / (8 * 3) = 1/8; bg: 9 * 4 / (8 * 9) = 1/2; 1 * 1/8 + 6 * 1/2
    loss = decoupled_alignment([student], [target], [mask], 1.0, 6.0)
    assert math.isclose(loss.item(), 3.125, rel_tol=1e-6)
    two_levels = decoupled_alignment([student, student], [target, target + 2], [mask, mask], 1.0, 6.0)
    assert math.isclose(two_levels.item(), (3.125 + 1 / 8) / 2, rel_tol=1e-6)  # mean over levels
    empty = decoupled_alignment([student], [target], [torch.zeros_like(mask)], 1.0, 6.0)
    assert torch.isfinite(empty)  # no foreground: 0 / max(1, 0), not NaN


def _grad_owners(model, loss):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)
    return {n for (n, _), g in zip(params, grads) if g is not None and g.abs().sum() > 0}


@pytest.mark.parametrize("aux_bn", [False, True])
def test_where_each_terms_gradient_goes(aux_bn):
    model = build_model(udfa_cfg("MODEL.UDFA.AUX_BN", aux_bn)).train()
    teacher = model.distiller.teacher
    with EventStorage(0):
        losses = model(tiny_batch())
    assert {"loss_cls_clean", "loss_cls_adv", "loss_udfa_kdfa", "loss_udfa_ssfa",
            "loss_udfa_clean_kd"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    main_bn = {n for n, p in model.named_parameters() if ".norm." in n and ".aux_bn." not in n}
    aux = {n for n, _ in model.named_parameters() if ".aux_bn." in n}
    assert bool(aux) == aux_bn
    for name in ("loss_udfa_kdfa", "loss_udfa_ssfa", "loss_udfa_clean_kd"):
        owners = _grad_owners(model, losses[name])
        assert owners and all(n.startswith("backbone.") for n in owners), name  # maps only
        if aux_bn:  # adversarial terms train the auxiliary BN only, clean-KD the clean BN only
            adversarial = name != "loss_udfa_clean_kd"
            assert bool(owners & aux) == adversarial and bool(owners & main_bn) != adversarial, name
    for suffix, adversarial in (("_clean", False), ("_adv", True)):
        owners = _grad_owners(model, losses["loss_cls" + suffix])
        assert any(n.startswith("roi_heads.") for n in owners)
        if aux_bn:
            assert bool(owners & aux) == adversarial and bool(owners & main_bn) != adversarial
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in model.parameters())  # the attack used input gradients only


def test_alignment_terms_reach_the_right_view_and_ssfa_target_is_detached():
    model = build_model(udfa_cfg()).train()
    maps = []  # the student backbone's outputs: clean pass, then adversarial pass
    model.backbone.register_forward_hook(lambda module, inputs, output: maps.append(output))
    with EventStorage(0):
        losses = model(tiny_batch())
    assert len(maps) == 2
    clean, adv = maps[0]["p3"], maps[1]["p3"]
    for name, reaches_clean, reaches_adv in (("loss_udfa_kdfa", False, True),
                                             ("loss_udfa_ssfa", False, True),  # sg(clean) target
                                             ("loss_udfa_clean_kd", True, False)):
        g_clean, g_adv = torch.autograd.grad(losses[name], [clean, adv], retain_graph=True,
                                             allow_unused=True)
        assert (g_clean is not None) == reaches_clean and (g_adv is not None) == reaches_adv, name


def test_teacher_sees_the_clean_images(monkeypatch):
    """KDFA and clean-KD target the frozen teacher's maps of the clean images (spec: the frozen
    pretrained copy sees clean images, the student adversarial ones), never the adversarial ones."""
    model = build_model(udfa_cfg()).train()
    teacher = model.distiller.teacher
    seen = []
    teacher.backbone.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    crafted = spy_on_attack(monkeypatch, udfa_distiller)
    batch = tiny_batch()
    with EventStorage(0):
        model(batch)
    assert len(seen) == 1 and len(crafted) == 1
    assert torch.equal(seen[0], teacher.preprocess_image(batch).tensor)
    adversarial = teacher.preprocess_image(with_images(batch, crafted[0]["out"])).tensor
    assert not torch.equal(seen[0], adversarial)


def test_clean_and_adversarial_loss_weights_scale_their_terms_exactly():
    """CLEAN_LOSS_WEIGHT multiplies every ``*_clean`` loss and only those, ADV_LOSS_WEIGHT every
    ``*_adv`` loss; the alignment terms do not depend on them (the attack's target is the
    unweighted total loss). Powers of two, so the products are exact."""
    runs = {}
    for clean_w, adv_w in ((1.0, 1.0), (0.25, 2.0)):
        torch.manual_seed(0)  # same student and teacher initialisation
        model = build_model(udfa_cfg("MODEL.UDFA.CLEAN_LOSS_WEIGHT", clean_w,
                                     "MODEL.UDFA.ADV_LOSS_WEIGHT", adv_w)).train()
        torch.manual_seed(1)  # same RPN / RoI sampling
        with EventStorage(0):
            runs[clean_w, adv_w] = {k: v.detach() for k, v in model(tiny_batch()).items()}
    unit, scaled = runs[1.0, 1.0], runs[0.25, 2.0]
    assert set(unit) == set(scaled)
    assert sum(k.endswith("_clean") for k in unit) == sum(k.endswith("_adv") for k in unit) == 4
    for name, value in unit.items():
        factor = 0.25 if name.endswith("_clean") else 2.0 if name.endswith("_adv") else 1.0
        assert value.item() > 0 and torch.equal(scaled[name], factor * value), name


def test_self_only_variant_needs_no_teacher():
    model = build_model(udfa_cfg("MODEL.UDFA.KDFA_WEIGHT", 0.0, "MODEL.UDFA.CLEAN_KD_WEIGHT", 0.0,
                                 "MODEL.UDFA.TEACHER.ALLOW_RANDOM_INIT", False)).train()
    assert model.distiller.teacher is None
    with EventStorage(0):
        losses = model(tiny_batch())
    assert "loss_udfa_kdfa" not in losses and "loss_udfa_clean_kd" not in losses
    assert losses["loss_udfa_ssfa"].item() > 0


def test_adversarial_training_only_row_has_no_clean_loss():
    model = build_model(load_cfg("configs/Demo/faster_rcnn_R_18_FPN_adv_train.yaml", "MODEL.WEIGHTS", "")).train()
    with EventStorage(0):
        losses = model(tiny_batch())
    assert set(losses) == {"loss_cls_adv", "loss_box_reg_adv", "loss_rpn_cls_adv", "loss_rpn_loc_adv"}


@pytest.mark.parametrize("config, opts", [
    ("configs/Demo/retinanet_R_18_FPN_udfa.yaml", ()),
    ("configs/Demo/fcos_R_18_FPN_baseline.yaml",  # FCOS: the shared mechanism's third family
     ("MODEL.META_ARCHITECTURE", "DistillFCOS", "MODEL.DISTILL.METHOD", "UDFA",
      "MODEL.UDFA.TEACHER.CONFIG_FILE", f"{REPO}/configs/Demo/fcos_R_18_FPN_baseline.yaml")),
])
def test_dense_students_train_a_step(config, opts):
    cfg = load_cfg(config, "MODEL.WEIGHTS", "", "MODEL.UDFA.TEACHER.ALLOW_RANDOM_INIT", True, *opts)
    model = build_model(cfg).train()
    loop = DistillTrainLoop(model, [tiny_batch()] * 2, build_optimizer(cfg, model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with EventStorage(0) as storage:
        loop.iter, loop.storage = 0, storage
        loop.run_step()
    logged = set(storage.latest())
    assert {"loss_udfa_kdfa", "loss_udfa_ssfa", "loss_udfa_clean_kd"} <= logged
    assert any(k.endswith("_adv") for k in logged) and any(k.endswith("_clean") for k in logged)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_auxiliary_bn_keeps_two_statistics_loads_stock_checkpoints_and_exports(tmp_path):
    cfg = udfa_cfg("MODEL.UDFA.AUX_BN", True)
    baseline = build_model(load_cfg(DEMO_BASELINE, "MODEL.ROI_BOX_HEAD.FC_DIM", 64))
    model = build_model(cfg)
    layers = [m for m in model.modules() if isinstance(m, AuxiliaryBatchNormMixin)]
    assert len(layers) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in baseline.modules())
    # a stock checkpoint (the trained clean detector): the auxiliary BN starts as a copy
    result = model.load_state_dict(baseline.state_dict(), strict=False)
    assert not any(".aux_bn." in k for k in result.missing_keys)
    bn = layers[0]
    assert torch.equal(bn.aux_bn.weight, bn.weight) and torch.equal(bn.aux_bn.running_var, bn.running_var)
    model.train()
    with EventStorage(0):
        model(tiny_batch())
    assert not torch.equal(bn.running_mean, bn.aux_bn.running_mean)  # clean vs adversarial batches
    x = torch.randn(2, bn.num_features, 4, 4)
    model.eval()
    with adversarial_bn(model):
        aux_out = bn(x)
    assert torch.allclose(aux_out, bn.aux_bn(x)) and not torch.allclose(bn(x), aux_out)
    # checkpoints with the auxiliary BN resume it; the export drops it and matches stock exactly
    path = tmp_path / "m.pth"
    torch.save({"model": model.state_dict()}, path)
    reloaded = build_model(cfg)
    reloaded.load_state_dict(torch.load(path, weights_only=True)["model"], strict=True)
    assert torch.equal(reloaded.backbone.bottom_up.stem.conv1.norm.aux_bn.running_mean,
                       model.backbone.bottom_up.stem.conv1.norm.aux_bn.running_mean)
    assert_export_matches_stock(model, cfg, "GeneralizedRCNN")


@pytest.mark.parametrize("through_aux_bn", [True, False])
def test_aux_bn_attack_is_crafted_through_the_adversarial_bn(monkeypatch, through_aux_bn):
    """With AUX_BN the adversarial example is crafted through the auxiliary BN (AdvProp; the
    release's mixbn switches to the adversarial BN before the attack's forward);
    ATTACK.THROUGH_AUX_BN False: through the clean BN (the clean pass reused). RetinaNet: its loss
    has no random sampling, so the input gradient can be recomputed by hand."""
    cfg = load_cfg(DEMO_RETINANET_UDFA, "MODEL.WEIGHTS", "", "MODEL.UDFA.AUX_BN", True,
                   "MODEL.UDFA.KDFA_WEIGHT", 0.0, "MODEL.UDFA.CLEAN_KD_WEIGHT", 0.0,
                   "MODEL.UDFA.ATTACK.THROUGH_AUX_BN", through_aux_bn)
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the two BatchNorms disagree (training mode: through their affine part)
        for m in model.modules():
            if isinstance(m, AuxiliaryBatchNormMixin):
                aux = m.aux_bn
                aux.weight.copy_(torch.rand(aux.weight.shape, generator=g) * 3 + 0.2)
                aux.bias.copy_(torch.randn(aux.bias.shape, generator=g))
                aux.running_mean.copy_(torch.randn(aux.running_mean.shape, generator=g))
                aux.running_var.copy_(torch.rand(aux.running_var.shape, generator=g) + 0.5)
    crafted = spy_on_attack(monkeypatch, udfa_distiller)
    batch = tiny_batch()
    with EventStorage(0):
        model(batch)
        (call,) = crafted

        def one_step_through(aux_bn):  # one signed step of 2 within eps 8 (the defaults)
            leaves = [x["image"].clone().requires_grad_(True) for x in batch]
            with adversarial_bn(model, aux_bn):
                losses = features_and_losses(model, with_images(batch, leaves))[1]
            grads = torch.autograd.grad(sum(losses.values()), leaves)
            return [project(x["image"] + 2.0 * g.sign(), x["image"], 8.0) for x, g in zip(batch, grads)]

        expected, other = one_step_through(through_aux_bn), one_step_through(not through_aux_bn)
    assert call["kwargs"]["steps"] == 1 and not call["kwargs"]["random_start"]
    assert any(not torch.equal(e, o) for e, o in zip(expected, other))  # the test can tell them apart
    assert all(torch.equal(a, e) for a, e in zip(call["out"], expected))


def test_adversarial_evaluation_attacks_flagged_inputs_only():
    model = build_model(load_cfg(DEMO_BASELINE, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = AttackingEvaluationModel(model, load_cfg(DEMO_BASELINE, "TEST.ADV.STEP_SIZE", 8.0))
    batch = tiny_batch()
    with torch.no_grad():  # as inference_on_dataset calls it
        plain = wrapped(batch)
        direct = model(batch)
        attacked = wrapped([{**x, ATTACK_FLAG: True} for x in batch])
    assert torch.equal(plain[0]["instances"].scores, direct[0]["instances"].scores)
    a, d = attacked[0]["instances"].pred_boxes.tensor, direct[0]["instances"].pred_boxes.tensor
    assert a.shape != d.shape or not torch.equal(a, d)
    assert not model.training and all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # BN statistics untouched
    with pytest.raises(ValueError, match="needs ground truth"):
        wrapped([{"image": batch[0]["image"], "height": 96, "width": 128, ATTACK_FLAG: True}])


def test_evaluation_attacks_are_their_own_keys(monkeypatch):
    """``_adv`` inputs are attacked with TEST.ADV, ``_pgd`` ones with TEST.PGD, never with the
    training attack MODEL.UDFA.ATTACK; seeds SEED + batch index, counted per suffix."""
    cfg = load_cfg(DEMO_BASELINE, "MODEL.UDFA.ATTACK.STEPS", 5, "MODEL.UDFA.ATTACK.EPSILON", 1.0,
                   "TEST.ADV.SEED", 100, "TEST.PGD.SEED", 7)
    assert dict(cfg.TEST.ADV) == {"EPSILON": 8.0, "STEP_SIZE": 2.0, "STEPS": 1, "RANDOM_START": False, "SEED": 100}
    assert dict(cfg.TEST.PGD) == {"EPSILON": 8.0, "STEP_SIZE": 2.0, "STEPS": 10, "RANDOM_START": True, "SEED": 7}
    calls = spy_on_attack(monkeypatch, udfa_attack, attack=False)
    model = build_model(cfg).eval()
    wrapped = AttackingEvaluationModel(model, cfg)
    batch = tiny_batch()
    with torch.no_grad():
        for suffix in (None, "pgd", "adv", "pgd"):  # no suffix: a "_adv" record of an older registration
            wrapped([{**x, ATTACK_FLAG: True, **({ATTACK_SUFFIX: suffix} if suffix else {})} for x in batch])
    single = dict(epsilon=8.0, step_size=2.0, steps=1, random_start=False)
    pgd = dict(epsilon=8.0, step_size=2.0, steps=10, random_start=True)
    assert [c["kwargs"] for c in calls] == [single, pgd, single, pgd]
    assert [c["seed"] for c in calls] == [100, 7, 101, 8]
    # the eps budget binds for PGD-10 only: a loss whose input gradient has a fixed random sign
    sign = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(0)).sign()
    image = torch.full((3, 8, 8), 100.0)
    for settings, reach in ((single, 2.0), (pgd, 8.0)):
        (adv,) = signed_gradient_attack(lambda ims: (ims[0] * sign).sum(), [image], **settings)
        assert torch.allclose(adv - image, reach * sign)
    with pytest.raises(ValueError, match="mixes attacks"):
        wrapped([{**batch[0], ATTACK_FLAG: True, ATTACK_SUFFIX: "pgd"}, {**batch[1], ATTACK_FLAG: True}])


def test_adversarial_dataset_names_and_test_loader():
    names = register_adversarial_names(["demo_shapes_val_adv", "demo_shapes_val_blur2_adv", "demo_shapes_val",
                                        "demo_shapes_val_pgd"])
    assert names == ["demo_shapes_val_adv", "demo_shapes_val_blur2_adv", "demo_shapes_val_pgd"]
    for name in ("demo_shapes_val_adv", "demo_shapes_val_pgd"):
        assert len(DatasetCatalog.get(name)) == len(DatasetCatalog.get("demo_shapes_val"))
        assert MetadataCatalog.get(name).thing_classes == MetadataCatalog.get("demo_shapes_val").thing_classes
    for name, suffix in (("demo_shapes_val_adv", "adv"), ("demo_shapes_val_pgd", "pgd")):
        loader = Trainer.build_test_loader(load_cfg(DEMO_BASELINE), name)
        first = next(iter(loader))[0]
        assert first[ATTACK_FLAG] and first[ATTACK_SUFFIX] == suffix and len(first["instances"]) > 0
        assert first["image"].shape[-2:] == (192, 192)  # test-time size
    assert ATTACK_SUFFIX not in DatasetCatalog.get("demo_shapes_val")[0]  # the base is untouched
    with pytest.raises(KeyError, match="no such registered dataset"):
        register_adversarial_names(["nothing_here_adv"])


def test_bad_configs_fail_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match="MODEL.UDFA.ATTACK.EPSILON"):
        validate_config(udfa_cfg("MODEL.UDFA.ATTACK.EPSILON", -1.0))
    with pytest.raises(ValueError, match="MODEL.UDFA.ATTACK.STEPS"):
        validate_config(udfa_cfg("MODEL.UDFA.ATTACK.STEPS", 0))
    for key, value in (("TEST.ADV.EPSILON", -1.0), ("TEST.PGD.STEP_SIZE", -2.0), ("TEST.PGD.STEPS", 0),
                       ("TEST.ADV.SEED", -1)):
        with pytest.raises(ValueError, match=key.replace(".", r"\.") + " = -?[0-9.]+ must be"):
            validate_config(udfa_cfg(key, value))
    with pytest.raises(ValueError, match="MODEL.UDFA.BG_WEIGHT"):
        validate_config(udfa_cfg("MODEL.UDFA.BG_WEIGHT", -6.0))
    with pytest.raises(ValueError, match="MODEL.UDFA.TEACHER.WEIGHTS"):
        validate_config(udfa_cfg("MODEL.UDFA.TEACHER.ALLOW_RANDOM_INIT", False, "MODEL.UDFA.TEACHER.WEIGHTS", ""))
    validate_config(udfa_cfg("MODEL.UDFA.TEACHER.ALLOW_RANDOM_INIT", False, "MODEL.UDFA.TEACHER.WEIGHTS", "",
                             "MODEL.UDFA.KDFA_WEIGHT", 0.0, "MODEL.UDFA.CLEAN_KD_WEIGHT", 0.0))  # SSFA only
    with pytest.raises(TeacherLoadError, match="MODEL.UDFA.TEACHER.WEIGHTS.*no such file"):
        build_model(udfa_cfg("MODEL.UDFA.TEACHER.ALLOW_RANDOM_INIT", False,
                             "MODEL.UDFA.TEACHER.WEIGHTS", str(tmp_path / "missing.pth")))
    with pytest.raises(ValueError, match="MODEL.UDFA.AUX_BN.*no trainable BatchNorm"):
        build_model(udfa_cfg("MODEL.UDFA.AUX_BN", True, "MODEL.RESNETS.NORM", "FrozenBN"))
    with pytest.raises(ValueError, match="MODEL.UDFA.IN_FEATURES"):
        build_model(udfa_cfg("MODEL.UDFA.IN_FEATURES", ["p9"]))


def test_train_net_udfa_then_clean_and_attacked_evaluation(tmp_path):
    out = tmp_path / "run"
    cfg = "configs/Demo/faster_rcnn_R_18_FPN_udfa_self.yaml"  # no teacher needed
    run_train_net("--config-file", cfg, *FAST, "MODEL.WEIGHTS", "", "OUTPUT_DIR", out, "DATASETS.TEST", "()")
    assert (out / "model_final.pth").is_file()
    test_sets = ("demo_shapes_val_first16", "demo_shapes_val_first16_adv")  # the config's, on 16 images
    proc = run_train_net("--config-file", cfg, "--eval-only", "MODEL.WEIGHTS", out / "model_final.pth",
                         "OUTPUT_DIR", tmp_path / "eval", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
                         "DATASETS.TEST", repr(test_sets))
    log = proc.stdout + proc.stderr
    for name in test_sets:
        assert f"Evaluation results for {name} in csv format" in log
