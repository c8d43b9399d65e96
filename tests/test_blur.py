"""Blur synthesis for the blur-robust self-distillation issue: kernel bank properties."""
import os

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
        "MODEL.WEIGHTS", "", "DATASETS.TEST", '("demo_shapes_val_first16","demo_shapes_val_first16_blur3")',
        "TEST.DETECTIONS_PER_IMAGE", 5, "MODEL.RPN.POST_NMS_TOPK_TEST", 20, "OUTPUT_DIR", tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert "Evaluation results for demo_shapes_val_first16 in csv format" in out
    assert "Evaluation results for demo_shapes_val_first16_blur3 in csv format" in out


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


# ---------------------------------------------------------------- kernel extents (INPUT.BLUR.EXTENTS / REFERENCE_SIZE)
def _moments(k):
    ys, xs = np.mgrid[: k.shape[0], : k.shape[1]]
    return [(k * xs).sum(), (k * ys).sum(), (k * xs * ys).sum(), (k**2).sum()]


# first moments (x, y), xy moment and energy of kernel_for_image(3, severity) of the seed-0 (training
# default) and seed-2022 (evaluation copies) banks, computed with the code before the extents had
# keys: the defaults must keep reproducing them (results measured with them stay valid)
PREVIOUS_KERNELS = {
    0: {1: [3.0, 3.0, 7.739148, 0.106601], 2: [6.0, 6.0, 40.323152, 0.057736],
        3: [8.863797, 7.288815, 67.632807, 0.025699], 4: [12.0, 12.0, 159.606667, 0.032784],
        5: [15.0, 15.0, 205.381544, 0.022612]},
    2022: {1: [3.0, 3.0, 8.430893, 0.1533], 2: [5.019334, 6.727677, 27.988147, 0.040887],
           3: [8.760873, 8.775587, 76.376622, 0.042095], 4: [10.638544, 17.041083, 188.662004, 0.02688],
           5: [17.710623, 14.480817, 272.063049, 0.021357]},
}


def test_default_extents_reproduce_the_previous_kernels():
    from lgd_detectron2.blur import datasets, mapper
    from lgd_detectron2.blur.kernels import DEFAULT_EXTENTS
    from common import load_cfg

    cfg = load_cfg("configs/Demo/faster_rcnn_R_18_FPN_blur_augment.yaml")
    assert list(cfg.INPUT.BLUR.EXTENTS) == list(DEFAULT_EXTENTS) == [7, 13, 19, 25, 31]
    assert cfg.INPUT.BLUR.REFERENCE_SIZE == 0
    train = mapper.BlurDatasetMapper(cfg, is_train=True)
    train_bank = mapper.training_bank(train.kernel_seed, train.extents, train.reference_size)
    evaluation = datasets._bank(datasets.blur_rule(cfg))
    for seed, bank in ((0, train_bank), (2022, evaluation)):
        assert bank.extents == (7, 13, 19, 25, 31)
        for severity, expected in PREVIOUS_KERNELS[seed].items():
            for shape in (None, (192, 192, 3), (480, 640, 3)):  # no scaling: any image size
                kernel = bank.kernel_for_image(3, severity, shape)
                assert kernel.shape == (bank.extents[severity - 1],) * 2
                assert _moments(kernel) == pytest.approx(expected, abs=2e-6)
    # the evaluation copies' cache folders keep their names: the images cached so far stay valid
    assert datasets._cache_dir("demo_shapes_val", 3, datasets.blur_rule(cfg)).endswith("demo_shapes_val_s3_seed2022")


def test_reference_size_scales_the_kernels_to_the_image():
    from lgd_detectron2.blur.kernels import kernel_size

    bank = BlurKernelBank(seed=2022, kernels_per_severity=8, reference_size=800)
    plain = BlurKernelBank(seed=2022, kernels_per_severity=8)
    # a 192-px demo image at reference 800: 0.24 x (7, 13, 19, 25, 31) = 1.68, 3.12, 4.56, 6.0,
    # 7.44 -> nearest odd sizes, at least 3
    assert [bank.size_for(s, (192, 192, 3)) for s in range(1, 6)] == [3, 3, 5, 7, 7]
    assert [bank.size_for(s, (600, 900)) for s in range(1, 6)] == [5, 9, 15, 19, 23]  # shorter side
    assert [kernel_size(e, 1600, 800) for e in (7, 31)] == [15, 63]
    for severity in range(1, 6):
        small = bank.kernel_for_image(3, severity, (192, 192, 3))
        assert small.shape == (bank.size_for(severity, (192, 192)),) * 2
        assert (small >= 0).all() and small.sum() == pytest.approx(1.0, abs=1e-5)
        # at the reference size: exactly the unscaled kernels
        assert np.array_equal(bank.kernel_for_image(3, severity, (800, 1000, 3)), plain.kernel_for_image(3, severity))
    # the same kernels drawn smaller (one per size, whatever the longer side)
    assert bank.kernel(5, 0, (400, 400)).shape == (15, 15)
    assert np.array_equal(bank.kernel(5, 1, (400, 400)), bank.kernel(5, 1, (500, 400)))
    assert (bank.kernel(5, 1, (400, 400)) > 0).sum() > 15  # a shake kernel stays a path
    with pytest.raises(ValueError, match="REFERENCE_SIZE"):
        bank.kernel_for_image(3, 2)  # scaling needs the image size


def test_mapper_and_evaluation_copies_share_the_scaled_kernels(tmp_path, monkeypatch):
    """REFERENCE_SIZE 800 on the 192-px demo images: training blur and the evaluation copy
    (registered with the config) draw kernels of the same scaled sizes; the copy is cached apart
    from the unscaled one and is blurred less at severity 5."""
    import cv2
    from detectron2.data import DatasetCatalog

    from common import load_cfg
    from lgd_detectron2.blur import BlurDatasetMapper, datasets, register_blurred_names
    from lgd_detectron2.config import validate_config

    monkeypatch.setenv("LGD_BLUR_CACHE", str(tmp_path))
    base = _small_base("blurkey_scaled")
    cfg = load_cfg("configs/Demo/faster_rcnn_R_18_FPN_blur_augment.yaml", "INPUT.BLUR.REFERENCE_SIZE", 800,
                   "DATASETS.TEST", (base, f"{base}_blur5"))
    validate_config(cfg)  # not registered yet: nothing to compare
    mapper = BlurDatasetMapper(cfg, is_train=True)
    np.random.seed(0)
    assert {mapper.sample_kernel((192, 192, 3)).shape[0] for _ in range(40)} == {3, 5, 7}
    try:
        plain = register_blurred_names([f"{base}_blur5"])[0]
        unscaled = DatasetCatalog.get(plain)
        assert register_blurred_names(list(cfg.DATASETS.TEST), cfg) == [plain]  # re-registered, scaled
        validate_config(cfg)
        scaled = DatasetCatalog.get(plain)
        rule = datasets.blur_rule(cfg)
        assert rule == ((7, 13, 19, 25, 31), 800)
        for u, s in zip(unscaled, scaled):
            assert os.path.dirname(u["file_name"]) != os.path.dirname(s["file_name"])  # cache keyed by the rule
        source = cv2.imread(DatasetCatalog.get(base)[0]["file_name"], cv2.IMREAD_COLOR)
        kernel = datasets._bank(rule).kernel_for_image(scaled[0]["image_id"], 5, source.shape)
        assert kernel.shape == (7, 7)
        assert np.array_equal(cv2.imread(scaled[0]["file_name"], cv2.IMREAD_COLOR), apply_blur(source, kernel))
        assert _sharpness(scaled[0]["file_name"]) > _sharpness(unscaled[0]["file_name"])
        # a config with other extents than the copy was registered with is refused, the key named
        other = load_cfg("configs/Demo/faster_rcnn_R_18_FPN_blur_augment.yaml", "DATASETS.TEST", (f"{base}_blur5",))
        with pytest.raises(ValueError, match="INPUT.BLUR.EXTENTS"):
            validate_config(other)
    finally:
        _remove(base)


def test_cache_key_follows_the_extents_and_reference_size():
    from lgd_detectron2.blur.datasets import _cache_dir, blur_rule

    rules = [blur_rule(), blur_rule(extents=[9, 15, 21, 27, 33]), blur_rule(extents=[7, 13, 19, 25, 35]),
             blur_rule(reference_size=800), blur_rule(reference_size=600),
             blur_rule(extents=[9, 15, 21, 27, 33], reference_size=800)]
    folders = [_cache_dir("demo_shapes_val", 3, r) for r in rules]
    assert len(set(folders)) == len(folders)
    assert folders[1].endswith("demo_shapes_val_s3_seed2022_ext9-15-21-27-33")
    assert folders[5].endswith("_ext9-15-21-27-33_ref800")
    assert blur_rule(extents=[8, 14, 20, 26, 32]) == blur_rule(extents=[9, 15, 21, 27, 33])  # same kernels


def test_derived_copy_of_a_blurred_copy_gets_the_config_rule(tmp_path, monkeypatch):
    """'<base>_blur3_adv' registers '<base>_blur3' with the config's rule (the attack's copy is
    made of it later)."""
    from lgd_detectron2.blur import datasets, register_blurred_names

    monkeypatch.setenv("LGD_BLUR_CACHE", str(tmp_path))
    base = _small_base("blurkey_derived")
    try:
        from common import load_cfg

        cfg = load_cfg("configs/Demo/faster_rcnn_R_18_FPN_baseline.yaml", "INPUT.BLUR.EXTENTS", [5, 9, 15, 21, 27])
        assert register_blurred_names([f"{base}_blur3_adv", "nope_blur2_adv"], cfg) == [f"{base}_blur3"]
        assert datasets._RULES[f"{base}_blur3"] == ((5, 9, 15, 21, 27), 0)
        assert register_blurred_names([f"{base}_blur3"]) == [f"{base}_blur3"]  # no cfg: keeps its rule
        assert datasets._RULES[f"{base}_blur3"] == ((5, 9, 15, 21, 27), 0)
    finally:
        _remove(base)


@pytest.mark.parametrize(
    "opts, message",
    [
        (("INPUT.BLUR.EXTENTS", [7, 13, 19, 25]), "INPUT.BLUR.EXTENTS"),
        (("INPUT.BLUR.EXTENTS", [7, 13, 19, 31, 25]), "INPUT.BLUR.EXTENTS"),
        (("INPUT.BLUR.EXTENTS", [0, 13, 19, 25, 31]), "INPUT.BLUR.EXTENTS"),
        (("INPUT.BLUR.EXTENTS", [7, 12, 13, 25, 31]), "INPUT.BLUR.EXTENTS"),  # 12 and 13: both 13 px
        (("INPUT.BLUR.EXTENTS", [7.5, 13, 19, 25, 31]), "INPUT.BLUR.EXTENTS"),
        (("INPUT.BLUR.REFERENCE_SIZE", -1), "INPUT.BLUR.REFERENCE_SIZE"),
    ],
)
def test_bad_extent_keys_are_named(opts, message):
    from common import load_cfg
    from lgd_detectron2.config import validate_config

    with pytest.raises(ValueError, match=message):
        validate_config(load_cfg("configs/Demo/faster_rcnn_R_18_FPN_blur_augment.yaml", *opts))


def _small_base(name):
    """A registered dataset of the first 3 demo validation images (removed by ``_remove``)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    DatasetCatalog.register(name, lambda: DatasetCatalog.get("demo_shapes_val")[:3])
    MetadataCatalog.get(name).set(thing_classes=MetadataCatalog.get("demo_shapes_val").thing_classes)
    return name


def _remove(base):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from lgd_detectron2.blur import datasets

    for name in [base] + [n for n in DatasetCatalog.list() if n.startswith(f"{base}_blur")]:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        datasets._RULES.pop(name, None)


def _sharpness(path):  # mean squared Laplacian: falls as blur grows
    import cv2

    return cv2.Laplacian(cv2.imread(path, cv2.IMREAD_GRAYSCALE).astype(np.float64), cv2.CV_64F).var()
