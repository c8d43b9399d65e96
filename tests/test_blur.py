"""Blur synthesis for the blur-robust self-distillation issue: kernel bank properties."""
import numpy as np
import pytest

from lgd_detectron2.blur import BlurKernelBank, apply_blur, camera_shake_kernel, linear_motion_kernel


@pytest.fixture(scope="module")
def bank():
    return BlurKernelBank(seed=7, kernels_per_severity=8)


def test_kernels_are_normalised_non_negative_and_sized_by_severity(bank):
    for severity, size in zip(range(1, 6), (7, 13, 19, 25, 31)):
        for k in bank.kernels[severity]:
            assert k.shape == (size, size) and k.dtype == np.float32
            assert (k >= 0).all()
            assert k.sum() == pytest.approx(1.0, abs=1e-5)


def test_bank_and_eval_kernels_are_deterministic(bank):
    again = BlurKernelBank(seed=7, kernels_per_severity=8)
    other = BlurKernelBank(seed=8, kernels_per_severity=8)
    for severity in range(1, 6):
        assert all(np.array_equal(a, b) for a, b in zip(bank.kernels[severity], again.kernels[severity]))
        assert not all(np.array_equal(a, b) for a, b in zip(bank.kernels[severity], other.kernels[severity]))
        assert np.array_equal(bank.kernel_for_image(42, severity), again.kernel_for_image(42, severity))
    # different images draw different kernels from the bank (not all the same one)
    picks = {bank.kernel_for_image(i, 3).tobytes() for i in range(40)}
    assert len(picks) > 4


def test_linear_kernel_is_a_segment_of_the_given_direction():
    k = linear_motion_kernel(length=9, angle=0.0, size=11)
    rows = k.sum(1)
    assert rows[5] == pytest.approx(1.0, abs=1e-6)  # horizontal: all mass in the centre row
    cols = np.nonzero(k[5])[0]
    assert cols.min() == 1 and cols.max() == 9  # 9 px long, centred
    vertical = linear_motion_kernel(length=9, angle=np.pi / 2, size=11)
    assert vertical.sum(0)[5] == pytest.approx(1.0, abs=1e-6)


def test_shake_kernel_spreads_over_a_trajectory():
    k = camera_shake_kernel(np.random.default_rng(0), size=21)
    assert (k > 0).sum() > 21  # a path, not a point
    assert k.sum() == pytest.approx(1.0, abs=1e-5)


def test_apply_blur_preserves_constants_and_paints_the_kernel(bank):
    flat = np.full((40, 50, 3), 123, dtype=np.uint8)
    assert np.array_equal(apply_blur(flat, bank.kernels[5][1]), flat)
    point = np.zeros((41, 41), dtype=np.uint8)
    point[20, 20] = 255
    k = linear_motion_kernel(length=7, angle=0.0, size=7)
    out = apply_blur(point, k).astype(np.float64)
    assert out.sum() == pytest.approx(255, abs=8)  # mass kept (up to uint8 rounding)
    assert (out[20] > 0).sum() == 7 and out[19].sum() == 0  # spread along the row only


def test_bad_severity_is_named(bank):
    with pytest.raises(ValueError, match="severity 6"):
        bank.kernel_for_image(1, 6)


def test_blurred_copy_of_a_registered_dataset(tmp_path, monkeypatch):
    import cv2
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from lgd_detectron2.blur import register_blurred_names

    monkeypatch.setenv("LGD_BLUR_CACHE", str(tmp_path))
    names = register_blurred_names(["demo_shapes_val", "demo_shapes_val_blur1", "demo_shapes_val_blur5"])
    assert names == ["demo_shapes_val_blur1", "demo_shapes_val_blur5"]
    sharp = DatasetCatalog.get("demo_shapes_val")[:3]
    mild, strong = (DatasetCatalog.get(n)[:3] for n in names)
    assert MetadataCatalog.get(names[1]).thing_classes == MetadataCatalog.get("demo_shapes_val").thing_classes

    def sharpness(path):  # mean squared Laplacian: falls as blur grows
        return cv2.Laplacian(cv2.imread(path, cv2.IMREAD_GRAYSCALE).astype(np.float64), cv2.CV_64F).var()

    for s, m, b in zip(sharp, mild, strong):
        assert m["annotations"] == s["annotations"] and m["image_id"] == s["image_id"]
        assert sharpness(s["file_name"]) > sharpness(m["file_name"]) > sharpness(b["file_name"])
    first = open(strong[0]["file_name"], "rb").read()
    import os

    os.remove(strong[0]["file_name"])
    DatasetCatalog.get(names[1])  # regenerated, identical (fixed kernel per image id)
    assert open(strong[0]["file_name"], "rb").read() == first
    with pytest.raises(KeyError, match="no such registered dataset"):
        register_blurred_names(["nope_blur2"])


def test_train_net_evaluates_sharp_and_blurred_in_one_run(tmp_path):
    """--eval-only with DATASETS.TEST (name, name_blur3): one AP table per dataset."""
    from test_train_net import run_train_net

    proc = run_train_net(
        "--config-file", "configs/Demo/faster_rcnn_R_18_FPN_baseline.yaml", "--eval-only",
        "MODEL.WEIGHTS", "", "DATASETS.TEST", '("demo_shapes_val","demo_shapes_val_blur3")',
        "TEST.DETECTIONS_PER_IMAGE", 5, "MODEL.RPN.POST_NMS_TOPK_TEST", 20, "OUTPUT_DIR", tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert "Evaluation results for demo_shapes_val in csv format" in out
    assert "Evaluation results for demo_shapes_val_blur3 in csv format" in out


def test_blurred_copy_scores_with_the_base_category_map(tmp_path, monkeypatch):
    """Regression: the blurred copy registered before its base dataset was ever loaded (so before
    load_coco_json set the category-id map) must still be scored with that map: ground truth
    given as predictions scores AP 100 on the blurred copy (unmapped ids scored ~7 AP)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, BoxMode, Instances
    import torch

    from lgd_detectron2.blur import register_blurred
    from lgd_detectron2.data import register_coco_folder
    from test_train_net import _coco

    monkeypatch.setenv("LGD_BLUR_CACHE", str(tmp_path / "cache"))
    json_file, image_dir = _coco(tmp_path)  # category ids 1 and 2
    register_coco_folder("tiny_cats", json_file, image_dir)
    blurred = register_blurred("tiny_cats", 2)
    records = DatasetCatalog.get(blurred)
    assert MetadataCatalog.get(blurred).thing_dataset_id_to_contiguous_id == {1: 0, 2: 1}
    evaluator = COCOEvaluator(blurred, tasks=("bbox",), output_dir=str(tmp_path / "eval"),
                              use_fast_impl=False)
    evaluator.reset()
    for r in records:
        inst = Instances((r["height"], r["width"]))
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in r["annotations"]]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.tensor([a["category_id"] for a in r["annotations"]])
        evaluator.process([{"image_id": r["image_id"]}], [{"instances": inst}])
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)
    DatasetCatalog.remove("tiny_cats"), DatasetCatalog.remove(blurred)
    MetadataCatalog.remove("tiny_cats"), MetadataCatalog.remove(blurred)
