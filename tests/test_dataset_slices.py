"""``<dataset>_first<N>``: the first N images of a registered dataset, scored on those images only."""
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from lgd_detectron2.blur import register_blurred_names
from lgd_detectron2.data.register import register_first_names


def test_slice_is_the_first_records_with_the_base_metadata_but_its_own_ground_truth(tmp_path, monkeypatch):
    monkeypatch.setenv("LGD_BLUR_CACHE", str(tmp_path))
    names = register_first_names(["demo_shapes_val", "demo_shapes_val_first5", "demo_shapes_val_first7_blur2"])
    assert set(names) <= {"demo_shapes_val_first5", "demo_shapes_val_first7"}  # [] if registered before
    assert {"demo_shapes_val_first5", "demo_shapes_val_first7"} <= set(DatasetCatalog.list())
    assert register_blurred_names(["demo_shapes_val_first7_blur2"]) == ["demo_shapes_val_first7_blur2"]
    full = DatasetCatalog.get("demo_shapes_val")
    assert [r["image_id"] for r in DatasetCatalog.get("demo_shapes_val_first5")] == [r["image_id"] for r in full[:5]]
    assert len(DatasetCatalog.get("demo_shapes_val_first7_blur2")) == 7
    meta = MetadataCatalog.get("demo_shapes_val_first5")
    assert meta.thing_classes == MetadataCatalog.get("demo_shapes_val").thing_classes
    assert meta.thing_dataset_id_to_contiguous_id == MetadataCatalog.get("demo_shapes_val").thing_dataset_id_to_contiguous_id
    assert not hasattr(meta, "json_file") and hasattr(MetadataCatalog.get("demo_shapes_val"), "json_file")


def test_slice_is_scored_on_its_own_images(tmp_path):
    """The ground truth as detections on the 4 images of the slice: AP 100. Scored against the base
    dataset's file (150 images) the same detections would miss the objects of 146 images."""
    from detectron2.evaluation import COCOEvaluator

    register_first_names(["demo_shapes_val_first4"])
    records = DatasetCatalog.get("demo_shapes_val_first4")
    evaluator = COCOEvaluator("demo_shapes_val_first4", output_dir=str(tmp_path))
    evaluator.reset()
    for r in records:
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in r["annotations"]]
        inst = Instances((r["height"], r["width"]))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.tensor([a["category_id"] for a in r["annotations"]])
        evaluator.process([{"image_id": r["image_id"]}], [{"instances": inst}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)


def test_slice_errors_name_the_problem():
    register_first_names(["demo_shapes_val_first999"])
    with pytest.raises(ValueError, match="demo_shapes_val_first999: 'demo_shapes_val' has only 150 images"):
        DatasetCatalog.get("demo_shapes_val_first999")
    with pytest.raises(KeyError, match="cannot slice 'no_such_set'"):
        register_first_names(["no_such_set_first3"])
    with pytest.raises(ValueError, match="at least one image"):
        register_first_names(["demo_shapes_val_first0"])


def test_a_registered_name_containing_first_is_left_alone():
    DatasetCatalog.register("my_first2_data", lambda: [])
    try:
        # the name itself and copies of it ("_blur3") are not slices of "my"
        assert register_first_names(["my_first2_data", "my_first2_data_blur3"]) == []
        assert "my_first2" not in DatasetCatalog.list()
    finally:
        DatasetCatalog.remove("my_first2_data")


def test_slices_of_voc_datasets_are_refused():
    DatasetCatalog.register("my_voc_set", lambda: [])
    MetadataCatalog.get("my_voc_set").set(evaluator_type="pascal_voc")
    try:
        with pytest.raises(ValueError, match="slices of a VOC dataset are not supported"):
            register_first_names(["my_voc_set_first3"])
    finally:
        DatasetCatalog.remove("my_voc_set")
