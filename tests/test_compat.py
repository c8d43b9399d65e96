"""The Detectron2 compatibility layer."""
import importlib

import pytest
import torch

from lgd_detectron2 import compat


def test_detectron2_modules_import():
    for name in ("detectron2.layers", "detectron2.modeling", "detectron2.evaluation",
                 "detectron2.engine", "detectron2.data"):
        importlib.import_module(name)


@pytest.mark.skipif(compat.has_native_ops(), reason="a compiled detectron2._C is installed")
def test_cpp_only_ops_raise_a_clear_error():
    from detectron2.layers import ROIAlignRotated, nms_rotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes = torch.tensor([[10.0, 10, 5, 5, 0]])
    for call in (lambda: pairwise_iou_rotated(boxes, boxes),
                 lambda: nms_rotated(boxes, torch.ones(1), 0.5),
                 lambda: ROIAlignRotated((2, 2), 1.0, 0)(torch.rand(1, 1, 8, 8), torch.tensor([[0.0, 4, 4, 2, 2, 0]]))):
        # (deformable convolution has no CPU kernel in any build; on GPU it reaches _C and
        # raises the same error)
        with pytest.raises(compat.MissingNativeOpError, match=r"detectron2\._C.*Build Detectron2 from source"):
            call()


@pytest.mark.skipif(compat.has_native_ops(), reason="a compiled detectron2._C is installed")
def test_coco_evaluation_uses_pycocotools():
    from pycocotools.cocoeval import COCOeval

    import detectron2.evaluation.coco_evaluation as coco_evaluation

    assert coco_evaluation.COCOeval_opt is COCOeval
    assert compat.apply() is True  # idempotent
    import detectron2

    assert getattr(detectron2._C, "_lgd_detectron2_fallback", False)


def test_retinanet_head_accepts_group_norm():
    """MODEL.RETINANET.NORM "GN" builds (v0.6's head probes the norm with 1 channel and fails)."""
    from torch import nn
    from detectron2.modeling import build_model

    from common import load_cfg

    cfg = load_cfg("configs/Demo/retinanet_R_18_FPN_baseline.yaml", "MODEL.RETINANET.NORM", "GN")
    head = build_model(cfg).head
    norms = [m for m in head.cls_subnet if isinstance(m, nn.GroupNorm)]
    assert len(norms) == cfg.MODEL.RETINANET.NUM_CONVS
    assert all(m.num_groups == 32 and m.num_channels == 64 for m in norms)


def test_opencv_is_the_contrib_build_alone():
    """Selective Search needs OpenCV's contrib modules; the plain wheels install the same cv2
    package, so neither may sit beside opencv-contrib-python-headless."""
    from importlib import metadata

    import cv2

    # the pin of the environment's route (tools/setup_env.sh): 4.8 beside numpy 1 (PyPI route),
    # 4.10 to 4.x beside numpy 2 (upstream route, constraints-upstream.txt)
    major, minor = map(int, metadata.version("opencv-contrib-python-headless").split(".")[:2])
    numpy_major = int(metadata.version("numpy").split(".")[0])
    assert (major, minor) == (4, 8) if numpy_major < 2 else (major == 4 and minor >= 10)
    for other in ("opencv-python-headless", "opencv-python"):
        with pytest.raises(metadata.PackageNotFoundError):
            metadata.version(other)
    assert hasattr(cv2.ximgproc.segmentation, "createSelectiveSearchSegmentation")
