"""UDFA: the attack, fg/bg masks and the decoupled loss, where each term's gradient goes, the
auxiliary BatchNorm, export, the adversarial evaluation and config errors."""
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
from lgd_detectron2.udfa.attack import (
    ATTACK_FLAG, AttackingEvaluationModel, detection_losses, losses_at_test_time,
    register_adversarial_names, signed_gradient_attack, with_images,
)
from lgd_detectron2.udfa.aux_bn import AuxiliaryBatchNormMixin, adversarial_bn
from lgd_detectron2.udfa.distiller import box_levels, decoupled_alignment, foreground_masks

DEMO_UDFA = "configs/Demo/faster_rcnn_R_18_FPN_udfa.yaml"
DEMO_BASELINE = "configs/Demo/faster_rcnn_R_18_FPN_baseline.yaml"


def udfa_cfg(*opts):
    return load_cfg(DEMO_UDFA, "MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
                    "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.UDFA.TEACHER.ALLOW_RANDOM_INIT", True, *opts)


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


def test_adversarial_evaluation_attacks_flagged_inputs_only():
    model = build_model(load_cfg(DEMO_BASELINE, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = AttackingEvaluationModel(model, load_cfg(DEMO_BASELINE, "MODEL.UDFA.ATTACK.STEP_SIZE", 8.0))
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


def test_adversarial_dataset_names_and_test_loader():
    names = register_adversarial_names(["demo_shapes_val_adv", "demo_shapes_val_blur2_adv", "demo_shapes_val"])
    assert names == ["demo_shapes_val_adv", "demo_shapes_val_blur2_adv"]
    assert len(DatasetCatalog.get("demo_shapes_val_adv")) == len(DatasetCatalog.get("demo_shapes_val"))
    assert MetadataCatalog.get("demo_shapes_val_adv").thing_classes == MetadataCatalog.get("demo_shapes_val").thing_classes
    loader = Trainer.build_test_loader(load_cfg(DEMO_BASELINE), "demo_shapes_val_adv")
    first = next(iter(loader))[0]
    assert first[ATTACK_FLAG] and len(first["instances"]) > 0
    assert first["image"].shape[-2:] == (192, 192)  # test-time size
    with pytest.raises(KeyError, match="no such registered dataset"):
        register_adversarial_names(["nothing_here_adv"])


def test_bad_configs_fail_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match="MODEL.UDFA.ATTACK.EPSILON"):
        validate_config(udfa_cfg("MODEL.UDFA.ATTACK.EPSILON", -1.0))
    with pytest.raises(ValueError, match="MODEL.UDFA.ATTACK.STEPS"):
        validate_config(udfa_cfg("MODEL.UDFA.ATTACK.STEPS", 0))
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
    proc = run_train_net("--config-file", cfg, "--eval-only", "MODEL.WEIGHTS", out / "model_final.pth",
                         "OUTPUT_DIR", tmp_path / "eval", "MODEL.RPN.POST_NMS_TOPK_TEST", "50")
    log = proc.stdout + proc.stderr
    for name in ("demo_shapes_val", "demo_shapes_val_adv"):
        assert f"Evaluation results for {name} in csv format" in log
