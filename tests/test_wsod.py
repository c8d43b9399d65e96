"""Weakly supervised detection: weak labels, MIL/OICR targets, SLV voting and pseudo boxes, the SD
loss's gradient path, VOC AP / CorLoc, proposal files, bad input, and a train_net run."""
import json
import math
import os
import pickle

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
from lgd_detectron2.wsod.evaluation import WSODEvaluator, average_precision, corloc
from lgd_detectron2.wsod.mil_head import refinement_targets, wsddn_image_loss
from lgd_detectron2.wsod.proposals import compute_proposals, write_proposal_file
from lgd_detectron2.wsod.self_distill import sd_loss, spatial_attention
from lgd_detectron2.wsod.slv import otsu_threshold, pseudo_boxes_from_map, vote_maps

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
    model = build(load_cfg(f"configs/Demo/{config}.yaml"))
    model.eval()
    inputs = _wsod_inputs()
    inputs[0]["height"], inputs[0]["width"] = 128, 128  # results are rescaled to the original size
    with torch.no_grad():
        out = model(inputs)
    for o, size in zip(out, (128, 64)):
        inst = o["instances"]
        assert len(inst) > 0 and inst.image_size == (size, size)
        assert inst.pred_boxes.tensor.max() <= size and (inst.pred_classes < 3).all()


def test_model_refuses_boxes_in_training():
    model = build(load_cfg("configs/Demo/wsod_R_18_FPN_oicr.yaml"))
    model.train()
    inputs = _wsod_inputs()
    inputs[0]["instances"] = Instances((64, 64))
    with pytest.raises(ValueError, match="image-level labels only; image 0"):
        model(inputs)


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
    for key in (f"{name}/wsod/mAP50", f"{name}_weak/wsod/CorLoc"):
        assert 0 <= final[key] <= 100
    proc = subprocess.run([*common, "--eval-only", *opts[2:], "MODEL.WEIGHTS", str(out / "model_final.pth")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"{name}_weak" in proc.stdout + proc.stderr and "CorLoc" in proc.stdout + proc.stderr
    # training on the dataset with boxes instead of its _weak copy fails before training
    bad = [o if o != f'("{name}_weak",)' else f'("{name}",)' for o in opts]
    proc = subprocess.run([*common, *bad], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and f"train on '{name}_weak'" in proc.stderr


@pytest.mark.parametrize("opts, message", [
    (("MODEL.WSOD.SLV.PSEUDO_BOXES", "otsu"), "PSEUDO_BOXES"),
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
