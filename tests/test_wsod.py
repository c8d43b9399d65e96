"""Weakly supervised detection: weak labels, MIL/OICR targets, SLV voting and pseudo boxes, the SD
loss's gradient path, VOC AP / CorLoc, proposal files, bad input, and a train_net run."""
import json
import math
import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.build import load_proposals_into_dataset
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from common import REPO, build, load_cfg
from lgd_detectron2.data.register import DatasetFormatError, register_coco_folder
from lgd_detectron2.wsod import register_weak_names
from lgd_detectron2.wsod.datasets import check_wsod_dataset, weak_records
from lgd_detectron2.wsod.evaluation import WSODEvaluator, average_precision, box_iou, corloc
from lgd_detectron2.wsod.mil_head import refinement_targets, wsddn_image_loss
from lgd_detectron2.wsod.proposals import compute_proposals, write_proposal_file
from lgd_detectron2.wsod.self_distill import sd_loss, spatial_attention
from lgd_detectron2.wsod.slv import otsu_threshold, pseudo_boxes_from_map, slv_pseudo_boxes, vote_maps

SLV_SD = "configs/Demo/wsod_R_18_FPN_slv_sd_threshold.yaml"


def test_weak_labels_hide_boxes():
    register_weak_names(["demo_shapes_val_weak"])
    full, weak = DatasetCatalog.get("demo_shapes_val"), DatasetCatalog.get("demo_shapes_val_weak")
    assert len(full) == len(weak)
    for a, b in zip(full, weak):
        assert "annotations" not in b and a["file_name"] == b["file_name"]
        assert b["image_labels"] == sorted({x["category_id"] for x in a["annotations"]})
    assert MetadataCatalog.get("demo_shapes_val_weak").weak_label_source == "demo_shapes_val"
    # a record with its own tags keeps them; tags outside the categories fail naming the image
    assert weak_records([{"image_id": 7, "image_labels": [2]}], "x", 3)[0]["image_labels"] == [2]
    with pytest.raises(DatasetFormatError, match=r"image id 7 \(a.png\).*\[3\]"):
        weak_records([{"image_id": 7, "file_name": "a.png", "image_labels": [3]}], "x", 3)


def test_wsddn_loss_on_two_proposals():
    # proposal 0 prefers class 0 (softmax [0.75, 0.25]), proposal 1 is undecided; detection
    # stream uniform (0.5 each): x = [[.375, .125], [.25, .25]], phi = [0.625, 0.375]
    cls_logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], requires_grad=True)
    det_logits = torch.zeros(2, 2)
    loss, x = wsddn_image_loss(cls_logits, det_logits, torch.tensor([0]), 2)
    assert torch.allclose(x, torch.tensor([[0.375, 0.125], [0.25, 0.25]]))
    assert loss.item() == pytest.approx(-math.log(0.625) - math.log(1 - 0.375), rel=1e-6)
    loss.backward()
    assert cls_logits.grad[0, 0] < 0  # raising class 0 on proposal 0 lowers the loss


def test_refinement_targets():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([[0.8, 0.1], [0.3, 0.2], [0.1, 0.6]])
    classes, weights = refinement_targets(boxes, scores, torch.tensor([0]), 0.5, 2)
    assert classes.tolist() == [0, 0, 2] and torch.allclose(weights, torch.full((3,), 0.8))
    classes, weights = refinement_targets(boxes, scores, torch.tensor([0, 1]), 0.5, 2)
    assert classes.tolist() == [0, 0, 1] and torch.allclose(weights, torch.tensor([0.8, 0.8, 0.6]))
    classes, weights = refinement_targets(boxes, scores, torch.tensor([], dtype=torch.long), 0.5, 2)
    assert classes.tolist() == [2, 2, 2] and weights.tolist() == [1, 1, 1]


def test_refinement_seeds_of_two_tags_never_share_a_proposal():
    # both tags' top proposal is p0; OICR takes it for the first tag (class order) and masks it
    # for the next one, whose seed becomes its best remaining proposal p2 (score 0.6)
    boxes = torch.tensor([[0, 0, 20, 10], [0, 0, 20, 9], [30, 5, 50, 25], [31, 5, 50, 25.0]])
    scores = torch.tensor([[0.9, 0.8], [0.5, 0.1], [0.1, 0.6], [0.1, 0.3]])
    classes, weights = refinement_targets(boxes, scores, torch.tensor([0, 1]), 0.5, 2)
    # IoU(p1, p0) = 180/200, IoU(p3, p2) = 380/400: each tag gets its own positives
    assert classes.tolist() == [0, 0, 1, 1]
    assert torch.allclose(weights, torch.tensor([0.9, 0.9, 0.6, 0.6]))
    # a proposal scoring 0 for the second tag still wins over the taken one
    two = boxes[[0, 2]]
    scores = torch.tensor([[0.9, 0.8], [0.1, 0.0]])
    classes, weights = refinement_targets(two, scores, torch.tensor([0, 1]), 0.5, 2)
    assert classes.tolist() == [0, 1] and weights.tolist() == [pytest.approx(0.9), 0.0]


class _FixedOutput(torch.nn.Module):
    """Stands in for a linear layer: returns hand-set logits whatever the box features."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits


def test_refinement_branch_k_learns_from_branch_k_minus_1():
    """OICR chaining: branch 1's targets come from WSDDN's x, branch k's from branch k-1's scores.
    Logits are log-probabilities, so every softmax below is the hand-written probability."""
    head = build(load_cfg("configs/Demo/wsod_R_18_FPN_oicr.yaml")).roi_heads
    assert head.num_classes == 3 and len(head.refinements) == 3 and head.slv_predictor is None
    log = lambda rows: torch.tensor(rows).log()  # noqa: E731
    # WSDDN: class softmax 0.5 for class 0 everywhere, detection softmax over the 4 proposals
    # [0.4, 0.3, 0.2, 0.1] -> x[:, 0] = [0.2, 0.15, 0.1, 0.05]: seed p0, weight 0.2
    head.wsddn_cls = _FixedOutput(log([[0.5, 0.25, 0.25]] * 4))
    head.wsddn_det = _FixedOutput(torch.cat([log([[0.4], [0.3], [0.2], [0.1]]), torch.zeros(4, 2)], 1))
    # columns: class 0, 1, 2, background
    r1 = [[0.1, 0.1, 0.1, 0.7], [0.1, 0.1, 0.1, 0.7], [0.6, 0.1, 0.1, 0.2], [0.3, 0.1, 0.1, 0.5]]
    r2 = [[0.1, 0.1, 0.1, 0.7], [0.5, 0.1, 0.1, 0.3], [0.2, 0.1, 0.1, 0.6], [0.2, 0.1, 0.1, 0.6]]
    r3 = [[0.25] * 4] * 4
    head.refinements = torch.nn.ModuleList(_FixedOutput(log(r)) for r in (r1, r2, r3))
    # 48x64 image; p0/p1 overlap (IoU 0.9), p2/p3 overlap (IoU 0.95), the pairs are disjoint
    boxes = torch.tensor([[0, 0, 20, 10], [0, 0, 20, 9], [30, 5, 50, 25], [31, 5, 50, 25.0]])
    props = [Instances((48, 64), proposal_boxes=Boxes(boxes))]
    losses = head.losses(None, {}, props, [torch.tensor([0])], torch.zeros(4, 8), [4])
    nl = lambda *p: -sum(math.log(v) for v in p) / len(p)  # noqa: E731  mean -log(prob of target)
    # branch 1: seed p0 of x (0.2) -> targets [0, 0, bg, bg]
    assert losses["loss_refine1"].item() == pytest.approx(0.2 * nl(0.1, 0.1, 0.2, 0.5), rel=1e-5)
    # branch 2: seed p2 of branch 1 (0.6) -> [bg, bg, 0, 0]
    assert losses["loss_refine2"].item() == pytest.approx(0.6 * nl(0.7, 0.3, 0.2, 0.2), rel=1e-5)
    # branch 3: seed p1 of branch 2 (0.5) -> [0, 0, bg, bg]
    assert losses["loss_refine3"].item() == pytest.approx(0.5 * math.log(4), rel=1e-5)


def test_oicr_regression_control_trains_on_oicr_seeds():
    """PSEUDO_BOXES "top_proposal" (configs/Demo/wsod_R_18_FPN_oicr_reg.yaml): the regression
    branch's pseudo boxes are each tag's top proposal of the refinements' mean, a proposal taken
    by one tag is not another's (tag 2's top p0 is taken by tag 0, so tag 2 gets p2), no voting
    maps are built, and the branch's Fast R-CNN losses are trained."""
    head = build(load_cfg("configs/Demo/wsod_R_18_FPN_oicr_reg.yaml")).roi_heads
    assert head.slv_predictor is not None and head.wsod.SLV.PSEUDO_BOXES == "top_proposal"
    log = lambda rows: torch.tensor(rows).log()  # noqa: E731
    head.wsddn_cls = _FixedOutput(log([[0.5, 0.25, 0.25]] * 4))
    head.wsddn_det = _FixedOutput(log([[0.25, 0.25, 0.25]] * 4))
    # columns: class 0, 1, 2, background; the three branches agree, so their mean is this table
    scores = [[0.25, 0.0001, 0.7, 0.0499], [0.2, 0.1, 0.5, 0.2], [0.1, 0.1, 0.6, 0.2], [0.1, 0.1, 0.1, 0.7]]
    head.refinements = torch.nn.ModuleList(_FixedOutput(log(scores)) for _ in range(3))
    boxes = torch.tensor([[0, 0, 20, 10], [2, 0, 24, 12], [30, 5, 50, 25], [40, 30, 60, 45.0]])
    props = [Instances((48, 64), proposal_boxes=Boxes(boxes))]
    seen = []
    label = head.label_proposals
    head.label_proposals = lambda p, b, c: seen.append((b.clone(), c.clone())) or label(p, b, c)
    dim = head.box_head.output_shape.channels
    with EventStorage(0):  # the stock predictor logs its accuracy
        losses = head.losses(None, {}, props, [torch.tensor([0, 2])], torch.zeros(4, dim), [4])
    (pseudo_boxes, pseudo_classes), = seen
    assert pseudo_classes.tolist() == [0, 2]
    assert pseudo_boxes.tolist() == [boxes[0].tolist(), boxes[2].tolist()]
    assert losses["loss_slv_cls"].item() > 0 and torch.isfinite(losses["loss_slv_box_reg"])
    assert "loss_sd" not in losses


def test_label_proposals_hand_made():
    """SLV's Fast R-CNN targets: a proposal takes the class and box of the pseudo box it overlaps
    with IoU >= REFINE_IOU (0.5), else background (class 3). A 40x80 image, boxes wider than tall."""
    head = build(load_cfg(SLV_SD)).roi_heads
    assert head.wsod.REFINE_IOU == 0.5 and head.num_classes == 3
    boxes = torch.tensor([[2, 4, 22, 14], [2, 4, 22, 13], [50, 20, 70, 35], [60, 20, 70, 35],
                          [0, 30, 10, 40]], dtype=torch.float32)
    props = Instances((40, 80), proposal_boxes=Boxes(boxes))
    pseudo = torch.tensor([[2, 4, 22, 14], [50, 20, 70, 35]], dtype=torch.float32)
    out = head.label_proposals(props, pseudo, torch.tensor([2, 0]))
    # IoU: p1 vs pseudo 0 = 180/200; p3 vs pseudo 1 = 150/300 (exactly the threshold: kept);
    # p4 overlaps nothing
    assert out.gt_classes.tolist() == [2, 2, 0, 0, 3]
    assert out.gt_boxes.tensor[:4].tolist() == [pseudo[0].tolist()] * 2 + [pseudo[1].tolist()] * 2
    assert torch.equal(out.proposal_boxes.tensor, boxes) and out.image_size == (40, 80)
    # no pseudo box: all background, regression targets are the proposals themselves
    empty = head.label_proposals(props, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert empty.gt_classes.tolist() == [3] * 5 and torch.equal(empty.gt_boxes.tensor, boxes)


def test_voting_and_pseudo_boxes_hand_worked():
    # 16x16 px image, 4-px cells: box A covers cells (0..1, 0..1), box B cells (1..2, 1..2);
    # both vote 1 -> cell (1, 1) gets 2, the other 6 covered cells 1: normalised 1 and 0.5.
    boxes = torch.tensor([[0, 0, 8, 8], [4, 4, 12, 12], [0, 12, 16, 16]], dtype=torch.float32)
    scores = torch.tensor([[1.0], [1.0], [0.0005]])  # the third is under the vote threshold
    maps = vote_maps(boxes, scores, (4, 4), 4, 0.001)
    expected = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 1, 0.5, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 0]])
    assert torch.allclose(maps[0], expected)
    assert pseudo_boxes_from_map(maps[0], 0.5, 0.1, 4).tolist() == [[0, 0, 12, 12]]
    assert pseudo_boxes_from_map(maps[0], 0.75, 0.1, 4).tolist() == [[4, 4, 8, 8]]
    # adaptive: Otsu separates the six 0.5 cells from the peak
    assert 0.5 < otsu_threshold(maps[0][maps[0] > 0].numpy()) <= 1.0
    assert pseudo_boxes_from_map(maps[0], None, 0.1, 4).tolist() == [[4, 4, 8, 8]]
    # two disjoint regions: two boxes, unless the smaller is under MIN_REGION_FRACTION
    two = torch.zeros(6, 6)
    two[0:2, 0:2] = 1.0
    two[4, 5] = 1.0
    assert sorted(pseudo_boxes_from_map(two, 0.5, 0.1, 1).tolist()) == [[0, 0, 2, 2], [5, 4, 6, 5]]
    assert pseudo_boxes_from_map(two, 0.5, 0.5, 1).tolist() == [[0, 0, 2, 2]]


def test_slv_pseudo_boxes_on_a_wide_image_hand_worked():
    """Asymmetric boxes on a 16 x 32 px image (a 4 x 8 grid of 4-px cells): an x/y swap in the
    voting or an (h, w) / (w, h) mix-up of the grid changes every number below."""
    from types import SimpleNamespace

    boxes = torch.tensor([[4, 0, 20, 8],     # cells x 1..4, y 0..1
                          [24, 8, 32, 16],   # cells x 6..7, y 2..3
                          [8, 4, 16, 12]],   # cells x 2..3, y 1..2
                         dtype=torch.float32)
    scores = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.5, 0.3], [1.0, 0.0, 0.3]])  # class 2 is no tag
    cfg = SimpleNamespace(MAP_STRIDE=4, VOTE_SCORE_THRESH=0.001, THRESHOLD=0.75, PSEUDO_BOXES="threshold",
                          MIN_REGION_FRACTION=0.1)
    found, classes, maps = slv_pseudo_boxes(boxes, scores, torch.tensor([0, 1]), (16, 32), cfg)
    assert maps.shape == (2, 4, 8)
    # class 0: the two boxes overlap in row 1, columns 2-3 (2 votes -> 1.0); their other cells 0.5
    expected = torch.zeros(4, 8)
    expected[0:2, 1:5] = 0.5
    expected[1:3, 2:4] = 0.5
    expected[1, 2:4] = 1.0
    assert torch.equal(maps[0], expected)
    expected = torch.zeros(4, 8)
    expected[2:4, 6:8] = 1.0  # class 1: one box, normalised to 1
    assert torch.equal(maps[1], expected)
    assert found.tolist() == [[8, 4, 16, 8], [24, 8, 32, 16]] and classes.tolist() == [0, 1]
    cfg.THRESHOLD = 0.5  # class 0's whole voted region: columns 1-4, rows 0-2
    found, classes, _ = slv_pseudo_boxes(boxes, scores, torch.tensor([0, 1]), (16, 32), cfg)
    assert found.tolist() == [[4, 0, 20, 12], [24, 8, 32, 16]] and classes.tolist() == [0, 1]


def test_average_precision_and_corloc_hand_made():
    gt = {1: np.array([[0, 0, 10, 10.0]]), 2: np.array([[0, 0, 10, 10.0], [20, 20, 30, 30.0]])}
    # ranked: hit (img 1), miss (img 2, IoU 0), hit (img 2), duplicate of img 1's box
    dets = [(1, 0.9, [0, 0, 10, 10]), (2, 0.8, [50, 50, 60, 60]), (2, 0.7, [20, 20, 30, 31]),
            (1, 0.6, [0, 0, 10, 10])]
    # recall 1/3, 1/3, 2/3, 2/3; precision 1, 1/2, 2/3, 1/2 -> VOC07 11-point: 4 x 1 + 3 x 2/3 + 4 x 0
    assert average_precision(dets, gt, use_07_metric=True) == pytest.approx((4 + 2) / 11)
    assert average_precision(dets, gt, use_07_metric=False) == pytest.approx(1 / 3 + 1 / 3 * 2 / 3)
    ground = [{1: gt[1], 2: gt[2], 3: np.zeros((0, 4))}, {1: np.zeros((0, 4)), 2: np.array([[0, 0, 4, 4.0]])}]
    top = {(1, 0): [1, 1, 10, 10], (2, 0): [50, 50, 60, 60], (2, 1): [0, 0, 4, 4], (3, 0): [0, 0, 1, 1]}
    assert corloc(top, ground, 2) == [0.5, 1.0]  # image 3 has no class 0: not counted


def test_average_precision_ignores_difficult_boxes():
    """VOC devkit (voc_eval.py): difficult boxes are not in npos, and a detection whose best match
    is a difficult box is neither a true nor a false positive."""
    gt = {1: np.array([[0, 0, 10, 10.0], [20, 20, 40, 30.0]])}
    difficult = {1: np.array([False, True])}
    found = [(1, 0.9, [0, 0, 10, 10])]
    # only the normal box found: recall 1 at precision 1 (counting the difficult one: 6/11)
    assert average_precision(found, gt, difficult=difficult) == pytest.approx(1.0)
    assert average_precision(found, gt) == pytest.approx(6 / 11)
    # a detection on the difficult box, ranked first, changes nothing
    on_difficult = [(1, 0.95, [20, 20, 40, 30])] + found
    assert average_precision(on_difficult, gt, difficult=difficult) == pytest.approx(1.0)
    assert average_precision(on_difficult, gt, difficult=difficult, use_07_metric=False) == pytest.approx(1.0)
    # ... and is not a false positive either: ignored, FP, TP -> precision 1/2 at recall 1 (1/3 if
    # the ignored detection were counted)
    dets = [(1, 0.95, [20, 20, 40, 30]), (1, 0.9, [50, 50, 60, 60]), (1, 0.8, [0, 0, 10, 10])]
    assert average_precision(dets, gt, difficult=difficult) == pytest.approx(0.5)
    assert average_precision(dets, gt, difficult=difficult, use_07_metric=False) == pytest.approx(0.5)
    # a class whose only boxes are difficult has no AP (nan, left out of the mean)
    assert math.isnan(average_precision(found, {1: gt[1][:1]}, difficult={1: np.array([True])}))


def test_voc_overlap_must_exceed_one_half():
    """The devkit counts a match when IoU > 0.5 (voc_eval: ``if ovmax > ovthresh``), not >= 0.5."""
    gt = {1: np.array([[0, 0, 20, 10.0]])}
    half = [(1, 0.9, [0, 0, 20, 5])]  # 100 / 200: exactly one half -> false positive
    assert box_iou(np.array([[0, 0, 20, 5.0]]), gt[1])[0, 0] == 0.5
    assert average_precision(half, gt) == 0.0
    above = [(1, 0.9, [0, 0, 20, 5.5])]
    assert average_precision(above, gt) == pytest.approx(1.0)
    ground = [{1: gt[1]}]
    assert corloc({(1, 0): [0, 0, 20, 5]}, ground, 1) == [0.0]
    assert corloc({(1, 0): [0, 0, 20, 5.5]}, ground, 1) == [1.0]


def test_corloc_leaves_out_images_whose_objects_of_the_class_are_all_difficult():
    # class 0: image 1 has a normal box (hit), image 2 only a difficult one (missed: not counted),
    # image 3 a normal and a difficult one (the top box hits the difficult one: an object is found)
    ground = [{1: np.array([[0, 0, 10, 20.0]]), 2: np.array([[0, 0, 10, 20.0]]),
               3: np.array([[0, 0, 10, 20.0], [30, 30, 60, 40.0]])}]
    difficult = [{1: np.array([False]), 2: np.array([True]), 3: np.array([False, True])}]
    top = {(1, 0): [0, 0, 10, 20], (2, 0): [40, 40, 50, 50], (3, 0): [30, 30, 60, 40]}
    assert corloc(top, ground, 1, difficult=difficult) == [1.0]
    assert corloc(top, ground, 1) == [pytest.approx(2 / 3)]
    # a class with difficult objects only: no image counts, nan
    assert math.isnan(corloc({}, [{2: ground[0][2]}], 1, difficult=[{2: difficult[0][2]}])[0])


def _tiny_weak_dataset(tmp_path, name, tags=None):
    """Three 64x64 images with one coloured square each, registered as a COCO JSON."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(3):
        pixels = (rng.uniform(0, 60, size=(64, 64, 3))).astype(np.uint8)
        pixels[10 + 5 * i:40 + 5 * i, 12:44] = (200, 40 + 60 * i, 40)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": 64, "width": 64})
        annotations.append({"id": i, "image_id": i, "category_id": 1 + i % 2, "iscrowd": 0,
                            "bbox": [12, 10 + 5 * i, 32, 30], "area": 960})
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    with open(tmp_path / "ann.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": cats}, f)
    register_coco_folder(name, str(tmp_path / "ann.json"), str(tmp_path))
    return name


def test_proposal_file_round_trip_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LGD_PROPOSAL_CACHE", str(tmp_path / "cache"))
    name = _tiny_weak_dataset(tmp_path, "wsod_roundtrip")
    path = tmp_path / "p.pkl"
    _, boxes = write_proposal_file(name, str(path), workers=2, progress=False)
    counts = [len(b) for b in boxes]
    assert len(counts) == 3 and min(counts) > 0
    with open(path, "rb") as f:
        written = pickle.load(f)
    records = load_proposals_into_dataset(DatasetCatalog.get(name), str(path))
    for record, boxes in zip(records, written["boxes"]):
        assert np.array_equal(record["proposal_boxes"], boxes)  # Detectron2 keeps our order
        assert (boxes[:, 2:] > boxes[:, :2]).all() and boxes.max() <= 64
    # one cached file per image; a second run reads them (same result, nothing new written)
    cached = sorted(str(p) for p in (tmp_path / "cache").rglob("*.npy"))
    assert len(cached) == 3
    again = compute_proposals(DatasetCatalog.get(name), workers=1, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(again, written["boxes"]))
    assert sorted(str(p) for p in (tmp_path / "cache").rglob("*.npy")) == cached
    register_weak_names([f"{name}_weak"])
    check_wsod_dataset(f"{name}_weak", str(path), training=True)


def test_bad_wsod_input_names_the_image(tmp_path):
    name = _tiny_weak_dataset(tmp_path, "wsod_bad")
    register_weak_names([f"{name}_weak"])
    records = DatasetCatalog.get(name)
    proposals = {"ids": [r["image_id"] for r in records],
                 "boxes": [np.array([[0, 0, 10, 10.0]]), np.zeros((0, 4)), np.array([[5, 5, 5, 9.0]])],
                 "objectness_logits": [np.zeros(1), np.zeros(0), np.zeros(1)]}
    with open(tmp_path / "p.pkl", "wb") as f:
        pickle.dump(proposals, f)
    with pytest.raises(DatasetFormatError, match=r"image id 1 \(.*1\.png\) has no proposal"):
        check_wsod_dataset(f"{name}_weak", str(tmp_path / "p.pkl"), training=True)
    with pytest.raises(FileNotFoundError, match="tools/selective_search.py --dataset wsod_bad"):
        check_wsod_dataset(f"{name}_weak", str(tmp_path / "none.pkl"), training=True)
    proposals["boxes"][1] = proposals["boxes"][2] = np.array([[0, 0, 10, 10.0]])
    with open(tmp_path / "p.pkl", "wb") as f:
        pickle.dump(proposals, f)
    with pytest.raises(DatasetFormatError, match=r"image id 0 .*carries boxes.*wsod_bad_weak"):
        check_wsod_dataset(name, str(tmp_path / "p.pkl"), training=True)


def _wsod_inputs():
    """Two 64x64 images, 12 proposals each, tags {0} and {1, 2}."""
    g = torch.Generator().manual_seed(0)
    batch = []
    for labels in ([0], [1, 2]):
        xy = torch.rand(12, 2, generator=g) * 40
        boxes = torch.cat([xy, xy + 8 + torch.rand(12, 2, generator=g) * 16], 1)
        props = Instances((64, 64), proposal_boxes=Boxes(boxes), objectness_logits=torch.zeros(12))
        batch.append({"image": torch.rand(3, 64, 64, generator=g) * 255, "height": 64, "width": 64,
                      "proposals": props, "image_labels": labels, "image_id": len(batch)})
    return batch


def test_sd_loss_reaches_only_the_listed_backbone_levels():
    cfg = load_cfg(SLV_SD, "MODEL.WSOD.SD.IN_FEATURES", ["p4"])
    model = build(cfg)
    model.train()
    with EventStorage():
        losses = model(_wsod_inputs())
    assert {"loss_mil", "loss_refine1", "loss_refine3", "loss_slv_cls", "loss_slv_box_reg", "loss_sd"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss_sd"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("backbone.bottom_up"))
    assert grads["backbone.fpn_output4.weight"].abs().sum() > 0
    for n, g in grads.items():  # not the heads, not the FPN outputs of other levels
        if n.startswith("roi_heads") or n.startswith(("backbone.fpn_output2", "backbone.fpn_output3", "backbone.fpn_output5")):
            assert g is None or g.abs().sum() == 0, n


def test_sd_attention_and_target_numbers():
    feature = torch.zeros(1, 2, 2, 2)
    feature[0, :, 0, 0] = 2.0
    feature[0, :, 1, 1] = 1.0
    assert torch.allclose(spatial_attention(feature), torch.tensor([[[1.0, 0], [0, 0.25]]]), atol=1e-5)
    # target = the map itself (same grid): loss = mean((A - T)^2) = (0.25 - 1)^2 / 4
    maps = [torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])]
    assert sd_loss([feature], maps, (2, 2), 1).item() == pytest.approx(0.75 ** 2 / 4, rel=1e-4)
    # an image without tags gives no target and no loss
    assert sd_loss([feature], [torch.zeros(0, 2, 2)], (2, 2), 1).item() == 0.0


@pytest.mark.parametrize("config", ["wsod_R_18_FPN_oicr", "wsod_R_18_FPN_slv_adaptive"])
def test_inference_returns_detections_in_image_coordinates(config):
    """Detections come back in each image's original size: asked for 96 x 160 (height x width) on a
    64 x 64 input, the boxes are the 64 x 64 ones times 2.5 in x and 1.5 in y."""
    model = build(load_cfg(f"configs/Demo/{config}.yaml"))
    model.eval()
    with torch.no_grad():
        native = model(_wsod_inputs())
        inputs = _wsod_inputs()
        inputs[0]["height"], inputs[0]["width"] = 96, 160
        rescaled = model(inputs)
    a, b = native[0]["instances"], rescaled[0]["instances"]
    assert len(a) > 0 and a.image_size == (64, 64) and b.image_size == (96, 160)
    assert torch.equal(a.pred_classes, b.pred_classes) and (a.pred_classes < 3).all()
    assert torch.equal(a.scores, b.scores)
    scale = torch.tensor([2.5, 1.5, 2.5, 1.5])
    assert torch.allclose(b.pred_boxes.tensor, a.pred_boxes.tensor * scale, atol=1e-4)
    # the second image keeps its size: same detections
    assert torch.equal(native[1]["instances"].pred_boxes.tensor, rescaled[1]["instances"].pred_boxes.tensor)
    if config == "wsod_R_18_FPN_oicr":  # the refinement branch scores the proposals, not regressed boxes
        proposals = _wsod_inputs()[0]["proposals"].proposal_boxes.tensor
        distance = (a.pred_boxes.tensor[:, None] - proposals[None]).abs().amax(-1)
        assert (distance.amin(1) < 1e-5).all()


def test_model_refuses_boxes_in_training():
    model = build(load_cfg("configs/Demo/wsod_R_18_FPN_oicr.yaml"))
    model.train()
    inputs = _wsod_inputs()
    inputs[0]["instances"] = Instances((64, 64))
    with pytest.raises(ValueError, match="image-level labels only; image 0"):
        model(inputs)


def _copypaste_metrics(log, dataset):
    """mAP50 and CorLoc of ``dataset`` from Detectron2's 'copypaste' lines (4 decimals)."""
    block = log.split(f"Evaluation results for {dataset} in csv format:")[1]
    values = re.search(r"copypaste: Task: wsod\n.*copypaste: .*\n.*copypaste: ([^\n]*)\n", block)[1]
    return dict(zip(("mAP50", "CorLoc"), map(float, values.split(","))))


def test_wsod_evaluator_hand_computed(tmp_path):
    """WSODEvaluator on a ``_weak`` split (boxes from its source): three 64x64 images, one box each
    (class a in images 0 and 2, class b in image 1), hand-made detections."""
    name = _tiny_weak_dataset(tmp_path, "wsod_eval_hand")
    register_weak_names([f"{name}_weak"])
    gt = {r["image_id"]: r["annotations"][0]["bbox"] for r in DatasetCatalog.get(name)}
    assert gt[2] == [12, 20, 32, 30]  # XYWH: [12, 20, 44, 50]
    detections = {  # image -> (class, score, XYXY box)
        0: [(0, 0.9, [12, 10, 44, 40]), (1, 0.8, [12, 10, 44, 40])],  # a found; b: not there
        1: [(1, 0.7, [12, 15, 44, 45]), (0, 0.6, [0, 0, 10, 10])],  # b found; a: not there
        2: [(0, 0.5, [12, 20, 44, 35])],  # a, IoU 480/960 = 0.5: not > 0.5, a miss
    }
    evaluator = WSODEvaluator(f"{name}_weak", use_07_metric=True)
    evaluator.reset()
    for image_id, dets in detections.items():
        inst = Instances((64, 64))
        inst.pred_boxes = Boxes(torch.tensor([d[2] for d in dets], dtype=torch.float32))
        inst.scores = torch.tensor([d[1] for d in dets])
        inst.pred_classes = torch.tensor([d[0] for d in dets])
        evaluator.process([{"image_id": image_id}], [{"instances": inst}])
    result = evaluator.evaluate()["wsod"]
    # a: TP, FP, FP with 2 boxes -> precision 1 up to recall 1/2: 11-point AP 6/11
    # b: FP, TP with 1 box -> precision 1/2 up to recall 1: AP 1/2
    assert result["AP50-a"] == pytest.approx(100 * 6 / 11)
    assert result["AP50-b"] == pytest.approx(50.0)
    assert result["mAP50"] == pytest.approx(100 * (6 / 11 + 0.5) / 2)
    # CorLoc: a's top box hits in image 0, misses in image 2; b's hits in image 1
    assert result["CorLoc-a"] == pytest.approx(50.0) and result["CorLoc-b"] == pytest.approx(100.0)
    assert result["CorLoc"] == pytest.approx(75.0)


def test_train_net_trains_and_evaluates_slv_sd(tmp_path):
    """The stock CLI end to end: a COCO JSON registered from the command line, its _weak copy for
    training, proposal files from the tool, SLV-SD training, then --eval-only (mAP and CorLoc)."""
    import subprocess
    import sys

    name = _tiny_weak_dataset(tmp_path, "wsod_cli")
    tool = [sys.executable, os.path.join(REPO, "tools", "selective_search.py")]
    subprocess.run([*tool, "--coco-dataset", name, str(tmp_path / "ann.json"), str(tmp_path),
                    "--dataset", name, "--output-dir", str(tmp_path), "--workers", "1"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    proposals = str(tmp_path / f"{name}_ss_fast.pkl")
    out = tmp_path / "run"
    common = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
              os.path.join(REPO, "configs/Demo/wsod_R_18_FPN_slv_sd_adaptive.yaml"),
              "--coco-dataset", name, str(tmp_path / "ann.json"), str(tmp_path)]
    opts = ["MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", "2", "DATASETS.TRAIN", f'("{name}_weak",)',
            "DATASETS.PROPOSAL_FILES_TRAIN", f'("{proposals}",)',
            "DATASETS.TEST", f'("{name}", "{name}_weak")',
            "DATASETS.PROPOSAL_FILES_TEST", f'("{proposals}", "{proposals}")',
            "SOLVER.MAX_ITER", "6", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2",
            "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([*common, *opts], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (out / "model_final.pth").is_file()
    with open(out / "metrics.json") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    trained = [r for r in rows if "loss_sd" in r]
    assert trained and all(math.isfinite(r[k]) for r in trained for k in r if k.startswith("loss_"))
    assert {"loss_slv_cls", "loss_mil", "loss_refine3"} <= set(trained[-1])
    final = rows[-1]
    proc = subprocess.run([*common, "--eval-only", *opts[2:], "MODEL.WEIGHTS", str(out / "model_final.pth")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the saved checkpoint, evaluated again, gives the numbers of the evaluation that ended training
    # (the metrics themselves are checked by hand in test_wsod_evaluator_hand_computed)
    log = proc.stdout + proc.stderr
    for dataset in (name, f"{name}_weak"):
        printed = _copypaste_metrics(log, dataset)
        assert set(printed) == {"mAP50", "CorLoc"}
        for key, value in printed.items():
            assert value == pytest.approx(final[f"{dataset}/wsod/{key}"], abs=1e-3), (dataset, key)
    # training on the dataset with boxes instead of its _weak copy fails before training
    bad = [o if o != f'("{name}_weak",)' else f'("{name}",)' for o in opts]
    proc = subprocess.run([*common, *bad], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and f"train on '{name}_weak'" in proc.stderr


@pytest.mark.parametrize("opts, message", [
    (("MODEL.WSOD.SLV.PSEUDO_BOXES", "otsu"), "PSEUDO_BOXES"),
    (("MODEL.WSOD.SLV.PSEUDO_BOXES", "top_proposal", "MODEL.WSOD.SD.ENABLED", True), "likelihood maps"),
    (("MODEL.WSOD.NUM_REFINEMENTS", 0), "NUM_REFINEMENTS"),
    (("MODEL.WSOD.TEST_BRANCH", "slv"), "SLV.ENABLED"),
    (("MODEL.LOAD_PROPOSALS", False), "LOAD_PROPOSALS"),
    (("MODEL.WSOD.SD.IN_FEATURES", ["res4"]), "not backbone outputs"),
    (("DATASETS.PROPOSAL_FILES_TEST", ("a.pkl",)), "one proposal file per dataset"),
])
def test_wsod_config_errors_name_the_key(opts, message):
    from lgd_detectron2.config import validate_config

    with pytest.raises(ValueError, match=message):
        validate_config(load_cfg("configs/Demo/wsod_R_18_FPN_oicr.yaml", *opts))


def test_voc07_c4_config_trains_a_step():
    """The VOC07 recipe's R-50 C4 body (random init, trainable BN, small images): one SLV-SD step."""
    cfg = load_cfg("configs/PascalVOC-WSOD/wsod_R_50_C4_slv_sd_adaptive.yaml", "MODEL.WEIGHTS", "",
                   "MODEL.RESNETS.NORM", "BN", "MODEL.ROI_HEADS.NUM_CLASSES", 3)
    model = build(cfg).train()
    with EventStorage():
        losses = model(_wsod_inputs())
    assert "loss_sd" in losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.res4[0].conv1.weight.grad.abs().sum() > 0


def test_classification_pretraining_feeds_the_wsod_body(tmp_path):
    """ImageTagClassifier trains its body from tags; its checkpoint loads into the WSOD model's
    body (same keys), the classifier layer is left out."""
    from detectron2.checkpoint import DetectionCheckpointer

    from lgd_detectron2.data.demo_shapes import _make_object_image

    image, cls_id = _make_object_image(np.random.default_rng(0))
    assert image.size == (64, 64) and cls_id in (0, 1, 2)
    pretrain = build(load_cfg("configs/Demo/wsod_R_18_pretrain.yaml")).train()
    batch = [{"image": torch.rand(3, 64, 64) * 255, "image_labels": [c]} for c in (0, 2)]
    losses = pretrain(batch)
    assert set(losses) == {"loss_image_cls"} and 0.5 < losses["loss_image_cls"].item() < 1.0
    losses["loss_image_cls"].backward()
    assert pretrain.backbone.bottom_up.res5[-1].conv2.weight.grad.abs().sum() > 0
    DetectionCheckpointer(pretrain, str(tmp_path)).save("pretrained")
    wsod = build(load_cfg("configs/Demo/wsod_R_18_FPN_oicr.yaml"), seed=1)
    DetectionCheckpointer(wsod).load(str(tmp_path / "pretrained.pth"))
    for key, value in pretrain.backbone.bottom_up.state_dict().items():
        assert torch.equal(wsod.backbone.bottom_up.state_dict()[key], value), key
