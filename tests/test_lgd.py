"""LGD: module shapes, box-to-cell masks, isolation between images, gradient flow per schedule
phase, backbone freeze, empty images, student-only inference and export."""
import math

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from common import (
    DEMO_BASELINE, assert_export_matches_stock, build, grad_norm, instances, load_cfg, losses_at,
    tiny_batch, tiny_lgd_cfg,
)
from lgd_detectron2.config import validate_config
from lgd_detectron2.engine.trainer import DistillTrainLoop, build_optimizer
from lgd_detectron2.lgd.self_teacher import (
    LabelEncoder, SelfTeacher, build_object_table, cell_masks, object_descriptors,
)


def _cells(mask):
    return sorted(map(tuple, mask.nonzero().tolist()))


def test_cell_masks_hand_worked():
    # 32x32 image, stride 8: 4x4 cells with centres at 4, 12, 20, 28 px.
    boxes = [
        [0, 0, 16, 16],      # covers centres 4 and 12 on both axes
        [13, 13, 14, 14],    # tiny: no centre inside -> only the cell holding its centre (1, 1)
        [20, 5, 20, 25],     # zero width on a centre column: rows 1-2 of column 2
        [40, 40, 60, 60],    # wholly outside: clamped to the corner -> last cell
        [20, 20, 10, 10],    # inverted: becomes the point (20, 20) -> cell (2, 2)
    ]
    table = build_object_table([instances(boxes, [0] * 5, (32, 32))], [(32, 32)], False, "cpu")
    masks = cell_masks(table, 4, 4, 8)
    assert masks.shape == (5, 4, 4)
    assert _cells(masks[0]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert _cells(masks[1]) == [(1, 1)]
    assert _cells(masks[2]) == [(1, 2), (2, 2)]
    assert _cells(masks[3]) == [(3, 3)]
    assert _cells(masks[4]) == [(2, 2)]
    # coarser level: every object still has at least one cell
    coarse = cell_masks(table, 1, 1, 32)
    assert coarse.flatten(1).sum(1).min() >= 1


def test_descriptors_use_each_images_own_size():
    inst_a = instances([[0, 0, 50, 100]], [1], (100, 50))
    inst_b = instances([[0, 0, 200, 100]], [0], (100, 200))
    table = build_object_table([inst_a, inst_b], [(100, 50), (100, 200)], True, "cpu")
    desc = object_descriptors(table, 3)
    assert desc.shape == (4, 4 + 3)
    # both real boxes span their whole image -> [-1, -1, 1, 1] whatever the padded batch size
    torch.testing.assert_close(desc[0, :4], torch.tensor([-1.0, -1, 1, 1]))
    torch.testing.assert_close(desc[2, :4], torch.tensor([-1.0, -1, 1, 1]))
    assert desc[0, 4:].tolist() == [-1, 1, -1] and desc[2, 4:].tolist() == [1, -1, -1]
    assert table.is_context.tolist() == [False, True, False, True]
    assert desc[1, 4:].tolist() == [-1, -1, -1]  # context object: no class


def _teacher(**kw):
    torch.manual_seed(0)
    args = dict(channels=16, strides={"p2": 4, "p3": 8}, num_classes=3, num_heads=4)
    args.update(kw)
    return SelfTeacher(**args)


def _features(b=2, c=16, h=24, w=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"p2": torch.randn(b, c, h, w, generator=g), "p3": torch.randn(b, c, h // 2, w // 2, generator=g)}


def test_label_encoder_and_teacher_shapes():
    enc = LabelEncoder(7, 16)
    out = enc(torch.randn(5, 7), torch.tensor([0, 0, 1, 1, 1]), 2)
    assert out.shape == (5, 16)
    batch = tiny_batch(size=(96, 128))
    feats = _features()
    for context in (False, True):
        maps = _teacher(add_context_box=context)(feats, [x["instances"] for x in batch], [(96, 128)] * 2)
        assert set(maps) == {"p2", "p3"}
        for k in maps:
            assert maps[k].shape == feats[k].shape
            assert torch.isfinite(maps[k]).all()


@pytest.mark.parametrize("context", [False, True])
def test_other_images_labels_do_not_change_an_images_maps(context):
    teacher = _teacher(add_context_box=context).eval()
    feats = _features()
    batch = tiny_batch()
    gts = [x["instances"] for x in batch]
    maps = teacher(feats, gts, [(96, 128)] * 2)
    gts2 = [gts[0], instances([[1, 2, 30, 40], [50, 50, 100, 90], [0, 0, 8, 8]], [1, 1, 0], (96, 128))]
    maps2 = teacher(feats, gts2, [(96, 128)] * 2)
    for k in maps:
        # identical up to float summation order (T differs, so matmul blocking may differ)
        torch.testing.assert_close(maps[k][0], maps2[k][0], rtol=1e-5, atol=1e-6)
        assert (maps[k][1] - maps2[k][1]).abs().max() > 1e-2, k


def test_teacher_handles_images_without_objects():
    feats = _features()
    for empty in ((1,), (0, 1)):
        batch = tiny_batch(empty=empty)
        teacher = _teacher(add_context_box=True)
        maps = teacher(feats, [x["instances"] for x in batch], [(96, 128)] * 2)
        loss = sum(m.square().mean() for m in maps.values())
        loss.backward()
        assert math.isfinite(loss.item())
        # every parameter takes part in the graph (DDP needs that)
        assert all(p.grad is not None for p in teacher.parameters())


def test_gradient_flow_per_phase():
    cfg = tiny_lgd_cfg("MODEL.LGD.PRE_NONDISTILL_ITERS", 10, "MODEL.LGD.POST_NONDISTILL_ITERS", 20)
    model = build_model(cfg).train()
    adapter = list(model.distiller.adapter.parameters())
    fpn = [p for n, p in model.backbone.named_parameters() if not n.startswith("bottom_up")]
    bottom_up = list(model.backbone.bottom_up.parameters())
    batch = tiny_batch()
    for it, on in ((0, False), (9, False), (10, True), (79, True), (80, False), (99, False)):
        loss = losses_at(model, batch, it)["loss_distill"]
        assert grad_norm(loss, adapter) > 0, it
        assert (grad_norm(loss, fpn) > 0) == on, it
        assert (grad_norm(loss, bottom_up) > 0) == on, it


@pytest.mark.parametrize("detach", [True, False])
def test_detach_appearance_embed(detach):
    cfg = tiny_lgd_cfg("MODEL.LGD.DETACH_APPEARANCE_EMBED", detach)
    model = build_model(cfg).train()
    losses = losses_at(model, tiny_batch(), 50)
    teacher_loss = sum(v for k, v in losses.items() if k.endswith("_tea"))
    student_params = list(model.backbone.parameters())
    assert (grad_norm(teacher_loss, student_params) > 0) == (not detach)
    # the teacher loss always trains the self-teacher and the shared head
    assert grad_norm(teacher_loss, list(model.distiller.self_teacher.parameters())) > 0
    assert grad_norm(teacher_loss, list(model.roi_heads.parameters())) > 0


def test_backbone_freeze_drops_all_updates():
    cfg = tiny_lgd_cfg("MODEL.LGD.PRE_FREEZE_STUDENT_BACKBONE_ITERS", 2, "SOLVER.WEIGHT_DECAY", 0.1)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    batch = tiny_batch()
    loop = DistillTrainLoop(model, [batch] * 10, optimizer)

    def snapshot(prefix_ok):
        return {n: p.detach().clone() for n, p in model.named_parameters() if prefix_ok(n)}

    is_bottom_up = lambda n: n.startswith("backbone.bottom_up.")  # noqa: E731
    is_fpn = lambda n: n.startswith("backbone.") and not is_bottom_up(n)  # noqa: E731
    bottom_up0, fpn0 = snapshot(is_bottom_up), snapshot(is_fpn)
    for it in (0, 1):
        with EventStorage(it) as storage:
            loop.iter, loop.storage = it, storage
            loop.run_step()
    bottom_up1, fpn1 = snapshot(is_bottom_up), snapshot(is_fpn)
    assert all(torch.equal(bottom_up0[n], bottom_up1[n]) for n in bottom_up0)
    assert any(not torch.equal(fpn0[n], fpn1[n]) for n in fpn0)
    # no momentum buffer was created for the frozen parameters
    frozen = {id(p) for p in model.backbone.bottom_up.parameters()}
    assert not any(id(p) in frozen for p in optimizer.state)
    with EventStorage(2) as storage:  # freeze over: now the bottom-up net moves
        loop.iter, loop.storage = 2, storage
        loop.run_step()
    bottom_up2 = snapshot(is_bottom_up)
    assert any(not torch.equal(bottom_up0[n], bottom_up2[n]) for n in bottom_up0)


@pytest.mark.parametrize("empty", [(1,), (0, 1)])
def test_training_losses_finite_without_objects(empty):
    cfg = tiny_lgd_cfg("MODEL.LGD.ADD_CONTEXT_BOX", True)
    model = build_model(cfg).train()
    losses = losses_at(model, tiny_batch(empty=empty), 60)
    assert {"loss_distill", "loss_cls_tea", "loss_rpn_cls_tea"} <= set(losses)
    for k, v in losses.items():
        assert torch.isfinite(v), k
    sum(losses.values()).backward()


def test_eval_is_the_plain_student_and_export_loads_in_stock_detectron2():
    cfg = tiny_lgd_cfg("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)
    model = build_model(cfg)
    # a few training steps so the weights are not at their initial values
    optimizer = build_optimizer(cfg, model)
    loop = DistillTrainLoop(model.train(), [tiny_batch()] * 5, optimizer)
    for it in range(60, 62):
        with EventStorage(it) as storage:
            loop.iter, loop.storage = it, storage
            loop.run_step()
    assert_export_matches_stock(model, cfg, "GeneralizedRCNN")


def test_eval_teacher_oracle_needs_ground_truth():
    cfg = tiny_lgd_cfg("MODEL.LGD.EVAL_TEACHER", True)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(tiny_batch())
        assert len(out) == 2 and "instances" in out[0]
        with pytest.raises(ValueError, match="EVAL_TEACHER needs ground truth"):
            model([{k: v for k, v in x.items() if k != "instances"} for x in tiny_batch()])


def test_lgd_needs_fpn_and_valid_levels():
    cfg = tiny_lgd_cfg("MODEL.LGD.IN_FEATURES", ["p9"])
    with pytest.raises(ValueError, match="p9"):
        build_model(cfg)
    cfg = tiny_lgd_cfg("MODEL.BACKBONE.NAME", "build_resnet_backbone",
                       "MODEL.RESNETS.OUT_FEATURES", ["res4"], "MODEL.RPN.IN_FEATURES", ["res4"],
                       "MODEL.ROI_HEADS.IN_FEATURES", ["res4"],
                       "MODEL.ANCHOR_GENERATOR.SIZES", [[32, 64, 128]])
    with pytest.raises(ValueError, match="FPN backbone"):
        validate_config(cfg)  # before training, from the config alone
    with pytest.raises(ValueError, match="FPN backbone"):
        build_model(cfg)


def test_lgd_subset_of_levels_keeps_complete_pyramid_for_head():
    cfg = tiny_lgd_cfg("MODEL.LGD.IN_FEATURES", ["p3", "p4", "p5", "p6"])
    model = build_model(cfg).train()
    assert list(model.distiller.self_teacher.strides) == ["p3", "p4", "p5", "p6"]
    losses = losses_at(model, tiny_batch(), 60)
    assert all(torch.isfinite(v) for v in losses.values())


def test_recompute_in_backward_gives_the_same_losses_and_gradients():
    batch = tiny_batch()
    results = []
    for recompute in (False, True):
        model = build(tiny_lgd_cfg("MODEL.LGD.RECOMPUTE_IN_BACKWARD", recompute)).train()
        torch.manual_seed(1)
        losses = losses_at(model, batch, 60)  # distillation on
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in losses.items()}, grads))
    (losses_a, grads_a), (losses_b, grads_b) = results
    assert losses_a.keys() == losses_b.keys() and grads_a.keys() == grads_b.keys()
    assert any(n.startswith("distiller.adapter.") for n in grads_a)
    for k in losses_a:
        torch.testing.assert_close(losses_a[k], losses_b[k], msg=k)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("weighting, expected", [("elements", (4 + 8) / 6), ("levels", (4 / 4 + 8 / 2) / 2)])
def test_distill_loss_level_weighting_hand_worked(weighting, expected):
    """Level A: 4 cells, instance-normalised student [1,-1,1,-1] vs a constant teacher (normalised
    to 0): squared sum 4. Level B: 2 cells, [1,-1] vs [-1,1]: squared sum 8."""
    from lgd_detectron2.lgd.distiller import normalized_mse

    student = [torch.tensor([1.0, -1, 1, -1]).view(1, 1, 1, 4), torch.tensor([3.0, -3]).view(1, 1, 1, 2)]
    teacher = [torch.full((1, 1, 1, 4), 7.0), torch.tensor([-2.0, 2]).view(1, 1, 1, 2)]
    assert normalized_mse(student, teacher, weighting).item() == pytest.approx(expected, rel=1e-4)
