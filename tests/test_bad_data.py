"""Bad annotations: each either trains as Detectron2 users expect or stops at data loading with the
file and image/annotation id named."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog
from detectron2.utils.env import seed_all_rng

from common import load_cfg
from lgd_detectron2.data import register_coco_folder
from lgd_detectron2.data.register import DatasetFormatError
from lgd_detectron2.engine import Trainer

CONFIGS = {
    "baseline": "configs/Demo/faster_rcnn_R_18_FPN_baseline.yaml",
    "lgd": "configs/Demo/faster_rcnn_R_18_FPN_lgd.yaml",
    "fgfi": "configs/Demo/faster_rcnn_R_18_FPN_fgfi.yaml",
}


def write_coco(root, annotations, n_images=3):
    os.makedirs(root / "img", exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for i in range(1, n_images + 1):
        Image.fromarray((rng.random((96, 96, 3)) * 255).astype("uint8")).save(root / "img" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": 96, "width": 96})
    data = {"images": images, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
            "annotations": [{"id": k + 1, "area": 1.0, "iscrowd": 0, **a} for k, a in enumerate(annotations)]}
    (root / "ann.json").write_text(json.dumps(data))
    return str(root / "ann.json"), str(root / "img")


MESSY = [
    {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30]},
    # image 2: no objects at all
    {"image_id": 3, "category_id": 2, "bbox": [20, 20, 0, 15]},      # zero width: dropped
    {"image_id": 3, "category_id": 3, "bbox": [80, 70, 40, 40]},     # partly outside: clipped
    {"image_id": 3, "category_id": 1, "bbox": [200, 200, 10, 10]},   # wholly outside: dropped
    {"image_id": 3, "category_id": 2, "bbox": [5, 5, 50, 50], "iscrowd": 1},  # crowd: ignored
]


def short_run(name, method, out_dir, *opts):
    cfg = load_cfg(
        CONFIGS[method], "DATASETS.TRAIN", (name,), "DATASETS.TEST", (), "SOLVER.IMS_PER_BATCH", 3,
        "SOLVER.MAX_ITER", 2, "DATALOADER.NUM_WORKERS", 0, "DATALOADER.FILTER_EMPTY_ANNOTATIONS", False,
        "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "MODEL.FGFI.TEACHER.ALLOW_RANDOM_INIT", True,
        "INPUT.MIN_SIZE_TRAIN", (96,), "INPUT.MAX_SIZE_TRAIN", 96, "OUTPUT_DIR", str(out_dir), *opts,
    )
    seed_all_rng(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer


@pytest.mark.parametrize("method", ["baseline", "lgd", "fgfi"])
def test_messy_annotations_train_with_finite_losses(tmp_path, method):
    json_file, img_dir = write_coco(tmp_path, MESSY)
    register_coco_folder("messy", json_file, img_dir)
    assert len(DatasetCatalog.get("messy")) == 3  # the image without objects is kept
    trainer = short_run("messy", method, tmp_path / "out")
    hist = trainer.storage.histories()
    losses = {k: [v for v, _ in h.values()] for k, h in hist.items() if k.startswith("loss")}
    assert losses and all(math.isfinite(v) for vs in losses.values() for v in vs)
    if method == "lgd":
        assert "loss_distill" in losses
    if method == "fgfi":
        assert "loss_fgfi_imitation" in losses


def test_inverted_box_is_rejected_with_annotation_id(tmp_path):
    json_file, img_dir = write_coco(tmp_path, [{"image_id": 2, "category_id": 1, "bbox": [40, 40, -10, 20]}])
    with pytest.raises(DatasetFormatError, match=r"annotation id 1 \(image id 2\) has an inverted box"):
        register_coco_folder("inverted", json_file, img_dir)


def test_missing_image_file_is_named(tmp_path):
    json_file, img_dir = write_coco(tmp_path, [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 20, 20]}])
    os.remove(os.path.join(img_dir, "2.png"))
    register_coco_folder("missing", json_file, img_dir)
    with pytest.raises(DatasetFormatError, match=r"image id 2 points to a missing file .*2\.png"):
        DatasetCatalog.get("missing")


def test_unreadable_image_is_named_at_loading(tmp_path):
    json_file, img_dir = write_coco(tmp_path, [{"image_id": i, "category_id": 1, "bbox": [1, 1, 20, 20]}
                                               for i in (1, 2, 3)])
    with open(os.path.join(img_dir, "2.png"), "wb") as f:
        f.write(b"this is not a png")
    register_coco_folder("corrupt", json_file, img_dir)
    with pytest.raises(DatasetFormatError, match=r"cannot load image id 2 from .*2\.png"):
        short_run("corrupt", "baseline", tmp_path / "out")
