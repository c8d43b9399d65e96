"""The built-in demo data: deterministic, valid COCO, boxes inside images, all classes present."""
import json
import os

import numpy as np
from pycocotools.coco import COCO

from detectron2.data import DatasetCatalog, MetadataCatalog

from lgd_detectron2.data import demo_shapes


def test_same_seed_gives_identical_files(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, seed in ((a, 7), (b, 7), (c, 8)):
        demo_shapes.generate_split(str(d), "val", 12, seed)
    assert demo_shapes.dataset_digest(str(a)) == demo_shapes.dataset_digest(str(b))
    assert demo_shapes.dataset_digest(str(a)) != demo_shapes.dataset_digest(str(c))


def test_builtin_splits_are_valid_and_registered():
    paths = demo_shapes.ensure_demo_data()
    assert set(paths) == {"train", "val", "select"}
    # the held-out select split is its own draw, not a copy of val
    with open(paths["val"][0]) as f_val, open(paths["select"][0]) as f_sel:
        val_boxes = [a["bbox"] for a in json.load(f_val)["annotations"]]
        select_boxes = [a["bbox"] for a in json.load(f_sel)["annotations"]]
    assert val_boxes[:20] != select_boxes[:20]
    assert len(DatasetCatalog.get("demo_shapes_select")) == demo_shapes.SPLITS["select"][0]
    for split, (json_file, image_dir) in paths.items():
        coco = COCO(json_file)
        assert len(coco.getImgIds()) == demo_shapes.SPLITS[split][0]
        cats = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        assert sorted(cats.values()) == sorted(demo_shapes.CLASSES)
        present = {a["category_id"] for a in coco.dataset["annotations"]}
        assert present == set(cats), f"{split}: not every class present"
        sizes = []
        for ann in coco.dataset["annotations"]:
            img = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0
            assert 0 <= x and 0 <= y and x + w <= img["width"] + 1e-6 and y + h <= img["height"] + 1e-6
            sizes.append(np.sqrt(w * h))
        # small, medium and large objects (COCO area ranges scaled to 192 px images)
        assert min(sizes) < 16 and max(sizes) > 64
        assert os.path.isfile(os.path.join(image_dir, coco.imgs[1]["file_name"]))
    dicts = DatasetCatalog.get("demo_shapes_val")
    assert len(dicts) == demo_shapes.SPLITS["val"][0]
    assert MetadataCatalog.get("demo_shapes_train").thing_classes == list(demo_shapes.CLASSES)
    # overlaps exist
    with open(paths["train"][0]) as f:
        data = json.load(f)
    assert _has_overlap(data)


def _has_overlap(data):
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
    for boxes in by_image.values():
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                (x1, y1, w1, h1), (x2, y2, w2, h2) = boxes[i], boxes[j]
                if min(x1 + w1, x2 + w2) > max(x1, x2) and min(y1 + h1, y2 + h2) > max(y1, y2):
                    return True
    return False
