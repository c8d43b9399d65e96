"""Pascal VOC folders as users have them: ``difficult`` objects, XML without the optional tags.

A hand-made folder of three 32x32 images (VOC pixel coordinates, 1-based and inclusive):

* ``a`` (every tag): dog [3, 2, 6, 4], dog [20, 10, 30, 28] difficult, cat [8, 12, 18, 30]
* ``b`` (only ``name`` and ``bndbox``): cat [5, 5, 25, 15]
* ``c`` (every tag): dog [4, 4, 20, 20] difficult

and one set of detections (Detectron2 frame: x1/y1 one less than VOC's, as the loader stores boxes)
scored by Detectron2's ``PascalVOCDetectionEvaluator`` (the devkit's voc_eval.py on the XML files)
and by ``WSODEvaluator`` (on the loaded records): both must give the devkit's numbers.
"""
import math
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, get_detection_dataset_dicts
from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.structures import Boxes, Instances

from lgd_detectron2.data.register import register_voc_folder
from lgd_detectron2.wsod import register_weak_names
from lgd_detectron2.wsod.evaluation import WSODEvaluator

OBJECTS = {  # image -> [(class, VOC box, difficult or None for "tag absent")]
    "a": [("dog", (3, 2, 6, 4), 0), ("dog", (20, 10, 30, 28), 1), ("cat", (8, 12, 18, 30), 0)],
    "b": [("cat", (5, 5, 25, 15), None)],
    "c": [("dog", (4, 4, 20, 20), 1)],
}
DETECTIONS = {  # image -> [(class name, score, Detectron2-frame XYXY box)]
    # dog in a: devkit IoU of VOC [3, 3, 6, 4] with [3, 2, 6, 4] is (4 x 2) / (4 x 3) = 2/3 with the
    # +1 pixel convention (naive IoU on the XML numbers: (3 x 1) / (3 x 2) = 1/2, a miss); cat exact
    "a": [("dog", 0.9, [2, 2, 6, 4]), ("cat", 0.8, [7, 11, 18, 30])],
    "b": [("cat", 0.7, [4, 4, 25, 15]), ("dog", 0.92, [0, 0, 10, 10])],  # cat exact; no dog in b
    "c": [("dog", 0.95, [0, 0, 2, 2]), ("dog", 0.3, [3, 3, 20, 20])],  # a miss; on the difficult dog
}
# dog: 1 normal box (a); ranked FP (c), FP (b), TP (a), ignored (c, difficult): precision 1/3 at
# recall 1 -> AP 1/3 (11-point and area). cat: 2 boxes, 2 TPs -> AP 1.
DOG_AP, CAT_AP = 1 / 3, 1.0


def _write_voc(root):
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for image_id, objects in OBJECTS.items():
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        ann = ET.Element("annotation")
        ET.SubElement(ann, "filename").text = f"{image_id}.jpg"
        size = ET.SubElement(ann, "size")
        for key, value in (("width", 32), ("height", 32), ("depth", 3)):
            ET.SubElement(size, key).text = str(value)
        for cls, box, difficult in objects:
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = cls
            if difficult is not None:
                ET.SubElement(obj, "pose").text = "Unspecified"
                ET.SubElement(obj, "truncated").text = "0"
                ET.SubElement(obj, "difficult").text = str(difficult)
            bndbox = ET.SubElement(obj, "bndbox")
            for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
                ET.SubElement(bndbox, key).text = str(value)
        ET.ElementTree(ann).write(root / "Annotations" / f"{image_id}.xml")
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nc\n")
    return str(root)


@pytest.fixture
def voc(tmp_path, request):
    name = f"voc_difficult_{request.node.name}"
    register_voc_folder(name, _write_voc(tmp_path / "VOC"), "train")
    return name


def _feed(evaluator, classes):
    evaluator.reset()
    for image_id, dets in DETECTIONS.items():
        inst = Instances((32, 32))
        inst.pred_boxes = Boxes(torch.tensor([d[2] for d in dets], dtype=torch.float32))
        inst.scores = torch.tensor([d[1] for d in dets])
        inst.pred_classes = torch.tensor([classes.index(d[0]) for d in dets])
        evaluator.process([{"image_id": image_id}], [{"instances": inst}])
    return evaluator.evaluate()


def test_voc_records_keep_the_difficult_flag(voc):
    assert MetadataCatalog.get(voc).thing_classes == ["cat", "dog"]
    records = {r["image_id"]: r for r in DatasetCatalog.get(voc)}
    a = records["a"]["annotations"]
    assert [(x["category_id"], x["bbox"], x["difficult"]) for x in a] == [
        (1, [2.0, 1.0, 6.0, 4.0], 0), (1, [19.0, 9.0, 30.0, 28.0], 1), (0, [7.0, 11.0, 18.0, 30.0], 0)]
    # no <difficult> (nor <pose>, <truncated>): not difficult
    assert [(x["category_id"], x["bbox"], x["difficult"]) for x in records["b"]["annotations"]] == [
        (0, [4.0, 4.0, 25.0, 15.0], 0)]
    assert records["c"]["annotations"][0]["difficult"] == 1


def test_voc_records_train_with_detectron2(voc):
    """The training path (dataset dicts, then the training mapper) ignores the extra key; difficult
    objects stay training boxes, as in Detectron2's own VOC loader."""
    dicts = get_detection_dataset_dicts([voc])
    assert len(dicts) == 3
    mapper = DatasetMapper(is_train=True, augmentations=[], image_format="BGR")
    out = mapper(next(d for d in dicts if d["image_id"] == "a"))
    assert out["image"].shape == (3, 32, 32)
    assert out["instances"].gt_classes.tolist() == [1, 1, 0]
    assert out["instances"].gt_boxes.tensor.tolist() == [[2, 1, 6, 4], [19, 9, 30, 28], [7, 11, 18, 30]]
    # the weak copy's tags come from the objects not marked difficult (OICR's roidb): c's only dog
    # is difficult, so c has no tag; a keeps dog for its normal dog
    register_weak_names([f"{voc}_weak"])
    assert [r["image_labels"] for r in DatasetCatalog.get(f"{voc}_weak")] == [[0, 1], [0], []]


def test_builtin_voc_datasets_keep_the_difficult_flag(tmp_path, monkeypatch):
    """Detectron2's builtin voc_2007_test (the VOC WSOD configs' test set) loads through the loader
    that keeps `difficult`; Detectron2's own drops the flag, so its difficult dogs would count."""
    meta = MetadataCatalog.get("voc_2007_test")
    if os.path.isabs(meta.dirname):
        pytest.skip(f"DETECTRON2_DATASETS points to {meta.dirname}")
    root = _write_voc(tmp_path / meta.dirname)
    os.rename(os.path.join(root, "ImageSets", "Main", "train.txt"), os.path.join(root, "ImageSets", "Main", "test.txt"))
    monkeypatch.chdir(tmp_path)
    records = {r["image_id"]: r for r in DatasetCatalog.get("voc_2007_test")}
    dog, cat = meta.thing_classes.index("dog"), meta.thing_classes.index("cat")
    assert [(x["category_id"], x["bbox"], x["difficult"]) for x in records["a"]["annotations"]] == [
        (dog, [2.0, 1.0, 6.0, 4.0], 0), (dog, [19.0, 9.0, 30.0, 28.0], 1), (cat, [7.0, 11.0, 18.0, 30.0], 0)]
    assert records["c"]["annotations"][0]["difficult"] == 1
    register_weak_names(["voc_2007_test_weak"])
    assert [r["image_labels"] for r in DatasetCatalog.get("voc_2007_test_weak")] == [sorted([cat, dog]), [cat], []]


def test_detectron2_voc_evaluator_reads_xml_without_optional_tags(voc):
    """Detectron2's evaluator parses the XML itself; <difficult> (and <pose>, <truncated>) may be
    missing, read as 0. Its numbers follow the devkit rule (dataset year 2012: area AP)."""
    result = _feed(PascalVOCDetectionEvaluator(voc), ["cat", "dog"])["bbox"]
    assert result["AP50"] == pytest.approx(100 * (CAT_AP + DOG_AP) / 2, abs=1e-6)


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_wsod_evaluator_on_a_voc_folder_follows_the_devkit(voc, use_07_metric):
    result = _feed(WSODEvaluator(voc, use_07_metric=use_07_metric), ["cat", "dog"])["wsod"]
    assert result["AP50-dog"] == pytest.approx(100 * DOG_AP)
    assert result["AP50-cat"] == pytest.approx(100 * CAT_AP)
    # CorLoc: c's dogs are all difficult, so c does not count for dog (its top box misses): dog
    # 1/1 (a), cat 2/2
    assert result["CorLoc-dog"] == pytest.approx(100.0) and result["CorLoc-cat"] == pytest.approx(100.0)
    assert result["CorLoc"] == pytest.approx(100.0)


def test_wsod_evaluator_of_the_weak_copy_reads_the_flags_of_its_source(voc):
    register_weak_names([f"{voc}_weak"])
    result = _feed(WSODEvaluator(f"{voc}_weak"), ["cat", "dog"])["wsod"]
    assert result["mAP50"] == pytest.approx(100 * (CAT_AP + DOG_AP) / 2)
    assert not math.isnan(result["CorLoc"]) and result["CorLoc"] == pytest.approx(100.0)
