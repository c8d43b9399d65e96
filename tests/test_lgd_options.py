"""LGD options beyond the default path: the original's interaction patterns, distillation levels
apart from the teacher's, the class-identity variants, the own-label attention probe, the teacher
guard and the class-agnostic evaluation; all hand-worked where the math allows."""
import logging
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from common import grad_norm, instances, load_cfg, losses_at, tiny_batch, tiny_lgd_cfg
from test_families import family_cfg
from lgd_detectron2.config import validate_config
from lgd_detectron2.distill.meta_arch import head_modules
from lgd_detectron2.lgd.distiller import normalized_mse, read_only_parameters
from lgd_detectron2.lgd.self_teacher import (
    SelfTeacher, build_object_table, cell_masks, coverage_masks, object_descriptors,
)

SIZE = (48, 80)  # non-square, so an x/y swap shows


def _teacher(**kw):
    torch.manual_seed(0)
    args = dict(channels=8, strides={"p2": 4, "p3": 8}, num_classes=3, num_heads=2)
    args.update(kw)
    return SelfTeacher(**args).eval()


def _features(seed=3):
    g = torch.Generator().manual_seed(seed)
    return {"p2": torch.randn(2, 8, 12, 20, generator=g), "p3": torch.randn(2, 8, 6, 10, generator=g)}


def _one_object_per_image():
    """Two images, one asymmetric box each: with a single key per image the attention weight is
    exactly 1, so the attention output is out_proj(v_proj(value))."""
    return [instances([[4, 8, 44, 20]], [2], SIZE), instances([[60, 2, 76, 40]], [0], SIZE)]


def _by_hand(teacher, feats, gts):
    """E' (T, C) and A_l (T, C) per level, computed directly from the definitions."""
    table = build_object_table(gts, [SIZE] * 2, False, "cpu")
    e = teacher.label_proj(teacher.label_encoder(object_descriptors(table, 3), table.batch_idx, 2)) \
        if teacher.uses_labels else None
    a = {}
    for l, f in feats.items():
        m = cell_masks(table, *f.shape[-2:], teacher.strides[l])  # (T, H, W)
        if teacher.uses_appearance:
            proj = teacher.appearance_proj(f)
            a[l] = torch.stack([proj[b][:, m[t]].mean(1) for t, b in enumerate(table.batch_idx.tolist())])
    return table, e, a


def _single_key_attention(attn, value):
    """MultiheadAttention output when each query sees exactly one key: out_proj(v_proj(value))."""
    c = value.shape[1]
    w_v, b_v = attn.in_proj_weight[2 * c:], attn.in_proj_bias[2 * c:]
    return F.linear(F.linear(value, w_v, b_v), attn.out_proj.weight, attn.out_proj.bias)


@pytest.mark.parametrize("pattern", ["stuGuided", "labelGuided", "teacher_fill", "student_fill"])
def test_interact_patterns_hand_worked(pattern):
    teacher = _teacher(interact_pattern=pattern)
    feats, gts = _features(), _one_object_per_image()
    table, e, a = _by_hand(teacher, feats, gts)
    blocks = teacher._masks(table, feats, 2)[1]
    with torch.no_grad():
        objects, _ = teacher.object_vectors(feats, table, blocks)
        for l in feats:
            expected = {
                "stuGuided": lambda: _single_key_attention(teacher.relation, e),     # V = labels
                "labelGuided": lambda: _single_key_attention(teacher.relation, a[l]),  # V = appearance
                "teacher_fill": lambda: e,
                "student_fill": lambda: a[l],
            }[pattern]()
            torch.testing.assert_close(objects[l], expected, rtol=1e-5, atol=1e-5)
    # a pattern builds only the modules it uses (every built parameter is in the graph: DDP)
    built = {n.split(".")[0] for n, _ in teacher.named_parameters()}
    assert ("relation" in built) == (pattern in ("stuGuided", "labelGuided"))
    assert ("label_encoder" in built) == (pattern != "student_fill")
    assert ("appearance_proj" in built) == (pattern != "teacher_fill")
    teacher.train()
    maps = teacher(feats, gts, [SIZE] * 2)
    sum(m.square().mean() for m in maps.values()).backward()
    assert all(p.grad is not None for p in teacher.parameters())


@pytest.mark.parametrize("pattern", ["stuGuided", "labelGuided"])
def test_attention_roles_hand_worked(pattern):
    """One head, two objects in one image: the weights are softmax(q k^T / sqrt(C)) with
    q from the queries and k from the keys of the pattern (stuGuided: appearance attends to the
    labels; labelGuided: labels attend to the appearance), the output is weights @ v, projected;
    the probe reports the diagonal against 1/2."""
    teacher = _teacher(num_heads=1, interact_pattern=pattern)
    feats = _features()
    gts = [instances([[4, 8, 44, 20], [50, 4, 70, 44]], [2, 1], SIZE), instances([], [], SIZE)]
    table, e, a = _by_hand(teacher, feats, gts)
    blocks = teacher._masks(table, feats, 2)[1]
    attn = teacher.relation
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    with torch.no_grad():
        objects, weights = teacher.object_vectors(feats, table, blocks, need_weights=True)
        probe = teacher.own_label_attention(feats, gts, [SIZE] * 2) if pattern == "stuGuided" else None
        for l in feats:
            queries, keys = (a[l], e) if pattern == "stuGuided" else (e, a[l])
            logits = F.linear(queries, w_q, b_q) @ F.linear(keys, w_k, b_k).t() / 8 ** 0.5
            expected_w = logits.softmax(dim=1)
            torch.testing.assert_close(weights[l], expected_w, rtol=1e-5, atol=1e-6)
            out = F.linear(expected_w @ F.linear(keys, w_v, b_v), attn.out_proj.weight, attn.out_proj.bias)
            torch.testing.assert_close(objects[l], out, rtol=1e-5, atol=1e-5)
            if pattern == "stuGuided":
                own, uniform = probe[l]
                torch.testing.assert_close(own, expected_w.diagonal())
                assert uniform.tolist() == [0.5, 0.5]
            # queries and keys differ, so swapping their roles changes the weights
            swapped = (F.linear(keys, w_q, b_q) @ F.linear(queries, w_k, b_k).t() / 8 ** 0.5).softmax(1)
            assert (swapped - expected_w).abs().max() > 1e-4


def test_class_identity_residual_adds_own_label_embedding():
    feats, gts = _features(), _one_object_per_image()
    base, residual = _teacher(), _teacher(class_identity="residual")
    residual.load_state_dict(base.state_dict())
    table, e, _ = _by_hand(base, feats, gts)
    blocks = base._masks(table, feats, 2)[1]
    with torch.no_grad():
        o_base, _ = base.object_vectors(feats, table, blocks)
        o_res, _ = residual.object_vectors(feats, table, blocks)
        for l in feats:
            torch.testing.assert_close(o_res[l], o_base[l] + e, rtol=1e-5, atol=1e-5)


def test_class_identity_channels_paint_each_box_into_its_class_channel():
    """With the object vectors zeroed, the painted map is K class channels: object t's cells are 1
    in the channel of its class; the teacher map is refine(relu(conv(that map)))."""
    teacher = _teacher(class_identity="class_channels")
    assert teacher.painted_conv.in_channels == 8 + 3
    with torch.no_grad():
        teacher.object_proj.weight.zero_()
        teacher.object_proj.bias.zero_()
    feats = _features()
    gts = [instances([[4, 8, 44, 20], [8, 12, 30, 40]], [2, 0], SIZE), instances([[60, 2, 76, 40]], [1], SIZE)]
    with torch.no_grad():
        maps = teacher(feats, gts, [SIZE] * 2)
        for l, f in feats.items():
            h, w = f.shape[-2:]
            painted = torch.zeros(2, 8 + 3, h, w)
            s = teacher.strides[l]
            for b, inst in enumerate(gts):
                for (x1, y1, x2, y2), k in zip(inst.gt_boxes.tensor.tolist(), inst.gt_classes.tolist()):
                    for i in range(h):
                        for j in range(w):
                            cy, cx = (i + 0.5) * s, (j + 0.5) * s
                            centre = (i == int((y1 + y2) / 2 // s) and j == int((x1 + x2) / 2 // s))
                            if (x1 <= cx <= x2 and y1 <= cy <= y2) or centre:
                                painted[b, 8 + k, i, j] += 1
            expected = teacher.refine(F.relu(teacher.painted_conv(painted)))
            torch.testing.assert_close(maps[l], expected, rtol=1e-4, atol=1e-5)
    # swapping two classes changes the maps (the class reaches them whatever the attention does)
    swapped = [instances([[4, 8, 44, 20], [8, 12, 30, 40]], [0, 2], SIZE), gts[1]]
    with torch.no_grad():
        assert (teacher(feats, swapped, [SIZE] * 2)["p2"][0] - maps["p2"][0]).abs().max() > 1e-3


def test_coverage_masks_hand_worked():
    """4 x 6 cells of stride 8 (a 32 x 48 image): each cell weighted by the share of its area in
    the box; the weights times the cell area sum to the box area; a point counts as 1 px."""
    boxes = [[6, 3, 21, 12], [3, 6, 12, 21], [10, 10, 10, 10], [0, 0, 0, 0]]  # 2nd: the 1st transposed
    table = build_object_table([instances(boxes, [0] * 4, (32, 48))], [(32, 48)], False, "cpu")
    m = coverage_masks(table, 4, 6, 8)
    assert m.shape == (4, 4, 6)
    # box 0: columns [0,8] [8,16] [16,24] overlap 2, 8, 5 px; rows [0,8] [8,16] overlap 5, 4 px
    expected = torch.zeros(4, 6)
    expected[:2, :3] = torch.tensor([[5 / 8], [4 / 8]]) * torch.tensor([[2 / 8, 1, 5 / 8]])
    torch.testing.assert_close(m[0], expected)
    torch.testing.assert_close(m[1], torch.zeros(4, 6).index_put_(
        (torch.arange(3)[:, None], torch.arange(2)[None]), expected[:2, :3].t()))
    assert (m[0] - m[1]).abs().max() > 0.1  # an x/y swap shows
    torch.testing.assert_close(m[0].sum() * 64, torch.tensor(15.0 * 9))
    # the point (10, 10) is widened to [9.5, 10.5]^2: 1/64 of cell (1, 1), nothing elsewhere
    assert m[2].nonzero().tolist() == [[1, 1]]
    torch.testing.assert_close(m[2, 1, 1], torch.tensor(1 / 64))
    # the point (0, 0) in the corner: [0, 1]^2, still 1 px^2
    assert m[3].nonzero().tolist() == [[0, 0]]
    torch.testing.assert_close(m[3, 0, 0], torch.tensor(1 / 64))


def test_coverage_region_mask_paints_and_pools_with_coverage_weights():
    """REGION_MASK coverage: the class channels carry each box's cell coverage (object vectors
    zeroed), and the appearance A_l ("student_fill": O_l = A_l) is the coverage-weighted average
    of the projected student map."""
    feats = _features()
    gts = [instances([[5, 9, 43, 22], [8, 12, 30, 41]], [2, 0], SIZE), instances([[61, 2, 75, 38]], [1], SIZE)]
    teacher = _teacher(class_identity="class_channels", region_mask="coverage")
    with torch.no_grad():
        teacher.object_proj.weight.zero_()
        teacher.object_proj.bias.zero_()
        maps = teacher(feats, gts, [SIZE] * 2)
        table = build_object_table(gts, [SIZE] * 2, False, "cpu")
        for l, f in feats.items():
            h, w = f.shape[-2:]
            s = teacher.strides[l]
            painted = torch.zeros(2, 8 + 3, h, w)
            for t, (b, k) in enumerate(zip(table.batch_idx.tolist(), table.classes.tolist())):
                x1, y1, x2, y2 = table.boxes[t].tolist()
                for i in range(h):
                    for j in range(w):
                        ox = max(0.0, min(x2, (j + 1) * s) - max(x1, j * s)) / s
                        oy = max(0.0, min(y2, (i + 1) * s) - max(y1, i * s)) / s
                        painted[b, 8 + k, i, j] += ox * oy
            expected = teacher.refine(F.relu(teacher.painted_conv(painted)))
            torch.testing.assert_close(maps[l], expected, rtol=1e-4, atol=1e-5)
            # the same teacher with the original binary masks gives another map
            binary = _teacher(class_identity="class_channels")
            binary.load_state_dict(teacher.state_dict())
            assert (binary(feats, gts, [SIZE] * 2)[l] - maps[l]).abs().max() > 1e-3

    pooled = _teacher(interact_pattern="student_fill", region_mask="coverage")
    with torch.no_grad():
        objects, _ = pooled.object_vectors(feats, table, pooled._masks(table, feats, 2)[1])
        for l, f in feats.items():
            proj = pooled.appearance_proj(f)
            m = coverage_masks(table, *f.shape[-2:], pooled.strides[l])
            expected = torch.stack([(proj[b] * m[t]).sum((1, 2)) / m[t].sum()
                                    for t, b in enumerate(table.batch_idx.tolist())])
            torch.testing.assert_close(objects[l], expected, rtol=1e-5, atol=1e-5)
    # trains end to end: every parameter gets a gradient
    teacher = _teacher(class_identity="class_channels", region_mask="coverage").train()
    sum(m.square().mean() for m in teacher(feats, gts, [SIZE] * 2).values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in teacher.parameters())
    # and through the config, in a whole model
    model = build_model(tiny_lgd_cfg("MODEL.LGD.REGION_MASK", "coverage")).train()
    assert model.distiller.self_teacher.region_mask == "coverage"
    losses = losses_at(model, tiny_batch(), 80)
    assert all(torch.isfinite(v) for v in losses.values()) and "loss_cls_tea" in losses


def test_invalid_pattern_and_identity_are_named():
    with pytest.raises(ValueError, match="INTERACT_PATTERN"):
        validate_config(tiny_lgd_cfg("MODEL.LGD.INTERACT_PATTERN", "stuguided"))
    with pytest.raises(ValueError, match="CLASS_IDENTITY"):
        validate_config(tiny_lgd_cfg("MODEL.LGD.CLASS_IDENTITY", "onehot"))
    with pytest.raises(ValueError, match="REGION_MASK"):
        validate_config(tiny_lgd_cfg("MODEL.LGD.REGION_MASK", "soft"))
    with pytest.raises(ValueError, match="student_fill"):
        validate_config(tiny_lgd_cfg("MODEL.LGD.INTERACT_PATTERN", "student_fill",
                                     "MODEL.LGD.CLASS_IDENTITY", "residual"))
    with pytest.raises(ValueError, match="teacher_fill"):
        validate_config(tiny_lgd_cfg("MODEL.LGD.INTERACT_PATTERN", "teacher_fill",
                                     "MODEL.LGD.CLASS_IDENTITY", "residual"))
    with pytest.raises(ValueError, match="DISTILL_FEATURES"):
        validate_config(tiny_lgd_cfg("MODEL.LGD.IN_FEATURES", ["p3", "p4"], "MODEL.LGD.DISTILL_FEATURES", ["p2"]))
    with pytest.raises(ValueError, match="DISTILL_FEATURES"):  # also at build time (IN_FEATURES empty)
        build_model(tiny_lgd_cfg("MODEL.LGD.DISTILL_FEATURES", ["p9"]))


def test_distill_features_apart_from_teacher_levels():
    """The teacher still builds every level (its losses are unchanged); L_distill reads only
    DISTILL_FEATURES, and only those levels' FPN outputs get its gradient."""
    batch = tiny_batch()
    full = build_model(tiny_lgd_cfg()).train()
    only_p3 = build_model(tiny_lgd_cfg("MODEL.LGD.DISTILL_FEATURES", ["p3"])).train()
    only_p3.load_state_dict(full.state_dict())
    assert only_p3.distiller.levels == ["p2", "p3", "p4", "p5", "p6"]
    torch.manual_seed(0)
    a = losses_at(full, batch, 80)  # distillation on (PRE_NONDISTILL_ITERS 67)
    torch.manual_seed(0)
    b = losses_at(only_p3, batch, 80)
    for k in a:
        if k.endswith("_tea"):
            torch.testing.assert_close(a[k], b[k], msg=k)
    # L_distill by hand on p3
    with torch.no_grad(), EventStorage(80):
        images = only_p3.preprocess_image(batch)
        feats = only_p3.backbone(images.tensor)
        gts = [x["instances"] for x in batch]
        t = only_p3.distiller.teacher_features(feats, gts, images.image_sizes)
        expected = normalized_mse([only_p3.distiller.adapter(feats["p3"])], [t["p3"]])
    torch.testing.assert_close(b["loss_distill"].detach(), expected, rtol=1e-4, atol=1e-6)
    fpn = only_p3.backbone
    assert grad_norm(b["loss_distill"], [fpn.fpn_output2.weight]) == 0
    assert grad_norm(b["loss_distill"], [fpn.fpn_output3.weight]) > 0
    assert grad_norm(a["loss_distill"], [full.backbone.fpn_output2.weight]) > 0


class _FakeTrainer:
    def __init__(self, model, storage, it, max_iter=100):
        self.model, self.storage, self.iter, self.max_iter = model, storage, it, max_iter


def test_teacher_guard_warns_switches_distillation_and_survives_checkpoints(caplog):
    from lgd_detectron2.lgd.guard import TeacherGuard, detection_loss_sums

    model = build_model(tiny_lgd_cfg()).train()
    fpn_out = [model.backbone.fpn_output3.weight]
    with EventStorage(0) as storage:
        for it, (student, teacher) in enumerate([(1.0, 3.0), (1.0, 2.0), (2.0, 2.5), (1.0, 2.5)]):
            storage.iter = it
            storage.put_scalars(loss_cls=student / 2, loss_rpn_cls=student / 2, loss_cls_tea=teacher,
                                loss_distill=9.0, smoothing_hint=False)
        # mean of the last 2 iterations: student (2 + 1) / 2, teacher (2.5 + 2.5) / 2
        assert detection_loss_sums(storage, 2) == pytest.approx((1.5, 2.5))
        guard = TeacherGuard(period=4, switch_off=True)
        guard.trainer = _FakeTrainer(model, storage, it=3)
        with caplog.at_level("WARNING"):
            guard.after_step()
    assert "2.5000 is not below the student's 1.2500" in caplog.text
    assert model.distiller.guard_switched_off
    # switched off: at a distill-on iteration the distillation loss no longer reaches the FPN
    assert grad_norm(losses_at(model, tiny_batch(), 80)["loss_distill"], fpn_out) == 0
    state = model.state_dict()
    assert state["distiller._extra_state"].item() is True
    fresh = build_model(tiny_lgd_cfg()).train()
    fresh.load_state_dict(state)
    assert fresh.distiller.guard_switched_off
    # the teacher ahead over the next period: distillation on again
    with EventStorage(4) as storage:
        for it in range(4, 8):
            storage.iter = it
            storage.put_scalars(loss_cls=1.0, loss_cls_tea=0.5, loss_distill=9.0, smoothing_hint=False)
        guard.trainer = _FakeTrainer(model, storage, it=7)
        guard.after_step()
    assert not model.distiller.guard_switched_off
    assert grad_norm(losses_at(model, tiny_batch(), 80)["loss_distill"], fpn_out) > 0


def test_teacher_guard_without_switch_only_warns(caplog):
    from lgd_detectron2.lgd.guard import TeacherGuard

    model = build_model(tiny_lgd_cfg()).train()
    with EventStorage(0) as storage:
        for it in range(3):
            storage.iter = it
            storage.put_scalars(loss_cls=1.0, loss_cls_tea=1.0, smoothing_hint=False)
        guard = TeacherGuard(period=3, switch_off=False)
        guard.trainer = _FakeTrainer(model, storage, it=2)
        with caplog.at_level("WARNING"):
            guard.after_step()
        assert "1.0000 is not below the student's 1.0000" in caplog.text  # equal: not ahead
        assert "distillation stays on" in caplog.text
        assert not model.distiller.guard_switched_off
        caplog.clear()
        guard.trainer.iter = 3  # not the end of a period: no decision
        guard.after_step()
        assert caplog.text == ""


def test_class_agnostic_ap_hand_worked():
    """Two objects, both found at their exact boxes but with each other's classes: AP 0 with
    classes, 100 without; a third detection far from any object costs nothing at its low score."""
    from pycocotools.coco import COCO

    from lgd_detectron2.lgd.diagnostics import class_agnostic_ap

    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "height": 60, "width": 90}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 10, 40, 20], "area": 800, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 5, 30, 50], "area": 1500, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    gt.createIndex()
    dets = [{"image_id": 1, "category_id": 2, "bbox": [5, 10, 40, 20], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [50, 5, 30, 50], "score": 0.8},
            {"image_id": 1, "category_id": 1, "bbox": [0, 40, 10, 10], "score": 0.1}]
    assert class_agnostic_ap(gt, dets) == pytest.approx((100.0, 100.0))
    # one of the two objects missed entirely: recall 0.5 at every threshold -> AP50 = 50.5 (101-point)
    ap, ap50 = class_agnostic_ap(gt, dets[:1])
    assert ap50 == pytest.approx(100 * 51 / 101, abs=0.01)


def test_lgd_from_scratch_warns_with_the_measurement(caplog):
    """LGD with no initial weights is named by a warning at validation (its measured loss from
    scratch); with weights, and for the baseline, nothing is said."""
    lgd, base = "configs/Demo/faster_rcnn_R_18_FPN_lgd.yaml", "configs/Demo/faster_rcnn_R_18_FPN_baseline.yaml"
    with caplog.at_level(logging.WARNING, logger="lgd_detectron2.lgd.config"):
        validate_config(load_cfg(lgd))
    assert any("randomly initialised backbone" in r.getMessage() and "8.3 AP below" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lgd_detectron2.lgd.config"):
        validate_config(load_cfg(lgd, "MODEL.WEIGHTS", "output/pretrained_body.pth"))
        validate_config(load_cfg(base))
    assert not any("randomly initialised" in r.getMessage() for r in caplog.records)


READ_ONLY_HEAD_CFGS = {"faster_rcnn": tiny_lgd_cfg, "retinanet": partial(family_cfg, "retinanet")}


@pytest.mark.parametrize("family", READ_ONLY_HEAD_CFGS)
def test_read_only_head_keeps_teacher_gradients_and_leaves_the_head_to_the_student(family):
    """TEACHER_LOSS_TRAINS_HEAD False: the same losses; L_det^I gives the self-teacher the same
    gradient as the original and the head none; the head's parameters are restored afterwards."""
    batch = tiny_batch()
    # appearance path detached (RetinaNet's demo config keeps it), so that only the head could
    # carry L_det^I into the student
    detached = ("MODEL.LGD.DETACH_APPEARANCE_EMBED", True)
    shared = build_model(READ_ONLY_HEAD_CFGS[family](*detached)).train()
    read_only = build_model(READ_ONLY_HEAD_CFGS[family](*detached, "MODEL.LGD.TEACHER_LOSS_TRAINS_HEAD", False)).train()
    read_only.load_state_dict(shared.state_dict())
    torch.manual_seed(0)
    a = losses_at(shared, batch, 80)
    torch.manual_seed(0)
    b = losses_at(read_only, batch, 80)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    tea_a = sum(v for k, v in a.items() if k.endswith("_tea"))
    tea_b = sum(v for k, v in b.items() if k.endswith("_tea"))
    head_a = [p for m in head_modules(shared) for p in m.parameters()]
    head_b = [p for m in head_modules(read_only) for p in m.parameters()]
    assert len(head_b) > 0 and all(isinstance(p, torch.nn.Parameter) for p in head_b)
    assert grad_norm(tea_a, head_a) > 0
    # no weight of the student (head, backbone, anything outside the distiller) learns from L_det^I
    student_weights = [p for n, p in read_only.named_parameters() if not n.startswith("distiller.")]
    assert grad_norm(tea_b, student_weights) == 0
    teacher_a = list(shared.distiller.self_teacher.parameters())
    teacher_b = list(read_only.distiller.self_teacher.parameters())
    grads_a = torch.autograd.grad(tea_a, teacher_a, retain_graph=True, allow_unused=True)
    grads_b = torch.autograd.grad(tea_b, teacher_b, retain_graph=True, allow_unused=True)
    assert sum(g is not None for g in grads_b) > 0
    for ga, gb in zip(grads_a, grads_b):
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(ga, gb)
    # the student's own losses still train the head
    student_b = sum(v for k, v in b.items() if k.startswith("loss_") and not k.endswith("_tea") and k != "loss_distill")
    assert grad_norm(student_b, head_b) > 0


def test_read_only_parameters_restores_a_module_reached_twice():
    shared_layer = torch.nn.Linear(2, 2)
    outer = torch.nn.Sequential(shared_layer)
    with read_only_parameters([outer, shared_layer]):
        assert not isinstance(shared_layer.weight, torch.nn.Parameter)
    assert isinstance(shared_layer.weight, torch.nn.Parameter)
    assert shared_layer.weight is dict(outer.named_parameters())["0.weight"]
