"""tools/train_net.py end to end: short training, checkpoint, metrics, --eval-only, dataset flags,
class-count mismatch."""
import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from common import REPO, load_cfg
from lgd_detectron2.data import register_coco_folder, register_voc_folder
from lgd_detectron2.data.register import DatasetFormatError

TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
FAST = ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.WARMUP_ITERS", "2",
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "50"]


def run_train_net(*args, check=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, TRAIN_NET, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-5000:])
    return proc


def _metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize(
    "config", ["faster_rcnn_R_18_FPN_baseline", "faster_rcnn_R_18_FPN_lgd", "faster_rcnn_R_18_FPN_blur_skd"]
)
def test_short_training_then_eval_only(tmp_path, config):
    out = tmp_path / "run"
    cfg = f"configs/Demo/{config}.yaml"
    run_train_net("--config-file", cfg, *FAST, "OUTPUT_DIR", out, "DATASETS.TEST", "()")
    assert (out / "model_final.pth").is_file() and (out / "model_0000002.pth").is_file()
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert ckpt["iteration"] == 5 and "optimizer" in ckpt["trainer"]["_trainer"]
    rows = [r for r in _metrics(out) if "total_loss" in r]
    assert rows and all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith("loss"))
    if config.endswith("lgd"):
        assert {"loss_distill", "loss_cls_tea", "loss_rpn_cls_tea"} <= set(rows[-1])
    if config.endswith("blur_skd"):
        assert {"loss_cls_sharp", "loss_deblur_feature", "loss_soft_label_cls"} <= set(rows[-1])

    eval_out = tmp_path / "eval"
    # the config's test sets, on their first 20 images
    test_sets = tuple(name.replace("demo_shapes_val", "demo_shapes_val_first20") for name in load_cfg(cfg).DATASETS.TEST)
    proc = run_train_net("--config-file", cfg, "--eval-only", "MODEL.WEIGHTS", out / "model_final.pth",
                         "OUTPUT_DIR", eval_out, "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "DATASETS.TEST", repr(test_sets),
                         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")  # detections after 6 iterations: AP finite
    for name in test_sets:
        assert f"Evaluation results for {name} in csv format" in proc.stdout + proc.stderr
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in proc.stdout + proc.stderr
    results = torch.load(eval_out / "inference" / "instances_predictions.pth", weights_only=False)
    assert len(results) == 20
    lines = [l.split("copypaste: ")[1] for l in (proc.stdout + proc.stderr).splitlines() if "copypaste: " in l]
    names, values = lines[-2].split(","), [float(v) for v in lines[-1].split(",")]
    # LGD's evaluation adds class-agnostic AP (every class merged into one) to the stock six
    extra = ["AP_agnostic", "AP50_agnostic"] if config.endswith("lgd") else []
    assert names == ["AP", "AP50", "AP75", "APs", "APm", "APl"] + extra
    assert all(math.isfinite(v) or math.isnan(v) for v in values)
    assert math.isfinite(values[0]) and math.isfinite(values[1])


def _write_images(folder, names, size=(64, 80)):
    os.makedirs(folder, exist_ok=True)
    for n in names:
        Image.fromarray((np.random.default_rng(0).random((size[0], size[1], 3)) * 255).astype("uint8")).save(
            os.path.join(folder, n))


def _coco(tmp_path, categories=((1, "cat"), (2, "dog")), cat_of_second=2):
    img_dir = tmp_path / "imgs"
    _write_images(str(img_dir), ["a.png", "b.png"])
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 64, "width": 80},
                   {"id": 2, "file_name": "b.png", "height": 64, "width": 80}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": cat_of_second, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
        ],
        "categories": [{"id": i, "name": n} for i, n in categories],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return str(path), str(img_dir)


def test_register_coco_folder(tmp_path):
    json_file, img_dir = _coco(tmp_path)
    register_coco_folder("t_coco", json_file, img_dir)
    dicts = DatasetCatalog.get("t_coco")
    assert len(dicts) == 2 and dicts[1]["annotations"][0]["category_id"] == 1
    assert MetadataCatalog.get("t_coco").thing_classes == ["cat", "dog"]


def test_register_coco_rejects_unknown_category(tmp_path):
    json_file, img_dir = _coco(tmp_path, cat_of_second=7)
    with pytest.raises(DatasetFormatError, match=r"annotation id 2 .*category_id 7"):
        register_coco_folder("t_bad", json_file, img_dir)


def test_register_coco_rejects_non_coco(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps([1, 2, 3]))
    with pytest.raises(DatasetFormatError, match="not a COCO detection file"):
        register_coco_folder("t_bad2", str(p), str(tmp_path))


def _voc(tmp_path, objects_per_image):
    root = tmp_path / "voc"
    os.makedirs(root / "Annotations")
    os.makedirs(root / "ImageSets" / "Main")
    ids = []
    for i, objs in enumerate(objects_per_image):
        fid = f"{i:04d}"
        ids.append(fid)
        _write_images(str(root / "JPEGImages"), [fid + ".jpg"])
        ann = ET.Element("annotation")
        size = ET.SubElement(ann, "size")
        ET.SubElement(size, "width").text = "80"
        ET.SubElement(size, "height").text = "64"
        for name, box in objs:
            o = ET.SubElement(ann, "object")
            ET.SubElement(o, "name").text = name
            bb = ET.SubElement(o, "bndbox")
            for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box):
                ET.SubElement(bb, k).text = str(v)
        ET.ElementTree(ann).write(root / "Annotations" / (fid + ".xml"))
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids) + "\n")
    return str(root)


def test_register_voc_folder_reads_classes(tmp_path):
    root = _voc(tmp_path, [[("dog", (5, 5, 30, 30))], [("cat", (10, 10, 40, 50)), ("dog", (1, 1, 9, 9))]])
    register_voc_folder("t_voc", root, "train")
    assert MetadataCatalog.get("t_voc").thing_classes == ["cat", "dog"]
    dicts = DatasetCatalog.get("t_voc")
    assert [a["category_id"] for a in dicts[1]["annotations"]] == [0, 1]
    assert dicts[0]["annotations"][0]["bbox"] == [4.0, 4.0, 30.0, 30.0]
    register_voc_folder("t_voc2", root, "train", ["dog", "cat", "bird"])
    assert MetadataCatalog.get("t_voc2").thing_classes == ["dog", "cat", "bird"]
    register_voc_folder("t_voc3", root, "train", ["bird"])
    with pytest.raises(DatasetFormatError, match="'dog' is not in the class list"):
        DatasetCatalog.get("t_voc3")


def test_voc_folder_weak_labels(tmp_path):
    """A VOC folder's ``_weak`` copy: image tags only, boxes left to the base dataset."""
    from lgd_detectron2.wsod import register_weak_names
    from lgd_detectron2.wsod.datasets import ground_truth_dataset

    root = _voc(tmp_path, [[("dog", (5, 5, 30, 30))], [("cat", (10, 10, 40, 50)), ("dog", (1, 1, 9, 9)),
                                                       ("dog", (20, 20, 29, 29))]])
    register_voc_folder("t_voc_w", root, "train")
    register_weak_names(["t_voc_w_weak"])
    weak = DatasetCatalog.get("t_voc_w_weak")
    assert [d["image_labels"] for d in weak] == [[1], [0, 1]] and all("annotations" not in d for d in weak)
    assert MetadataCatalog.get("t_voc_w_weak").thing_classes == ["cat", "dog"]
    assert ground_truth_dataset("t_voc_w_weak") == "t_voc_w"


def test_dataset_flags_and_class_count_mismatch(tmp_path):
    json_file, img_dir = _coco(tmp_path)
    voc_root = _voc(tmp_path, [[("dog", (5, 5, 30, 30))]])
    proc = run_train_net(
        "--config-file", "configs/Demo/faster_rcnn_R_18_FPN_baseline.yaml",
        "--coco-dataset", "mine", json_file, img_dir, "--voc-dataset", "myvoc", voc_root, "train",
        "DATASETS.TRAIN", '("mine",)', "DATASETS.TEST", "()", "OUTPUT_DIR", tmp_path / "o",
        check=False,
    )
    assert proc.returncode != 0
    assert "MODEL.ROI_HEADS.NUM_CLASSES = 3 but the training set 'mine' has 2 classes" in proc.stderr
    # with the right class count, the registered datasets train
    run_train_net(
        "--config-file", "configs/Demo/faster_rcnn_R_18_FPN_baseline.yaml",
        "--coco-dataset", "mine", json_file, img_dir, "--voc-dataset", "myvoc", voc_root, "train",
        "--voc-classes", "cat,dog", "DATASETS.TRAIN", '("mine", "myvoc")', "DATASETS.TEST", "()", "MODEL.ROI_HEADS.NUM_CLASSES", "2",
        *FAST, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", tmp_path / "o2",
    )
    assert (tmp_path / "o2" / "model_final.pth").is_file()
