"""Helpers shared by the tests: configs from our YAMLs, tiny models and inputs (CPU)."""
import os

import torch

import lgd_detectron2  # noqa: F401
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, PolygonMasks

from lgd_detectron2.config import get_distill_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_BASELINE = os.path.join(REPO, "configs/Demo/faster_rcnn_R_18_FPN_baseline.yaml")
DEMO_LGD = os.path.join(REPO, "configs/Demo/faster_rcnn_R_18_FPN_lgd.yaml")


def load_cfg(path, *opts):
    cfg = get_distill_cfg()
    cfg.merge_from_file(path if os.path.isabs(path) else os.path.join(REPO, path))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def tiny_lgd_cfg(*opts):
    """The demo LGD recipe shrunk for unit tests (32-channel FPN, 8 heads of 4 dims)."""
    return load_cfg(
        DEMO_LGD, "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 64, "SOLVER.MAX_ITER", 100, *opts,
    )


def build(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    return model


def instances(boxes, classes, size):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    return inst


def tiny_batch(size=(96, 128), seed=0, empty=(), masks=False):
    """Two images with a few objects each (image indices in ``empty`` have none); with ``masks``
    every object also gets a polygon mask (a diamond inside its box)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    specs = [
        ([[10, 12, 50, 60], [40, 30, 90, 80], [60, 5, 64, 9]], [0, 1, 2]),
        ([[5, 5, 120, 90], [30, 40, 45, 52]], [2, 0]),
    ]
    batch = []
    for i, (boxes, classes) in enumerate(specs):
        if i in empty:
            boxes, classes = [], []
        image = (torch.rand(3, h, w, generator=g) * 255).float()
        inst = instances(boxes, classes, (h, w))
        if masks:
            inst.gt_masks = PolygonMasks(
                [[[(x0 + x1) / 2, y0, x1, (y0 + y1) / 2, (x0 + x1) / 2, y1, x0, (y0 + y1) / 2]]
                 for x0, y0, x1, y1 in boxes]
            )
        batch.append({"image": image, "height": h, "width": w, "instances": inst})
    return batch


def paired(batch):
    """Add a blurred copy of each image (a horizontal 9-px box blur) as 'image_blurred'."""
    import numpy as np

    from lgd_detectron2.blur import apply_blur

    kernel = np.full((1, 9), 1 / 9, np.float32)
    for x in batch:
        hwc = x["image"].permute(1, 2, 0).numpy().astype(np.uint8)
        x["image_blurred"] = torch.as_tensor(apply_blur(hwc, kernel)).permute(2, 0, 1).float()
    return batch


def losses_at(model, batch, iteration):
    """Training losses of ``batch`` at schedule iteration ``iteration``."""
    from detectron2.utils.events import EventStorage

    with EventStorage(iteration):
        return model(batch)


def grad_norm(loss, params):
    """Sum of |d loss / d p| over ``params`` (0 for those outside the graph)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return sum(0.0 if g is None else g.abs().sum().item() for g in grads)


def assert_same_detections(outputs_a, outputs_b, masks=False):
    """Two models' eval outputs are identical (and not empty)."""
    for a, b in zip(outputs_a, outputs_b):
        a, b = a["instances"], b["instances"]
        assert len(a) > 0
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores)
        assert torch.equal(a.pred_classes, b.pred_classes)
        if masks:
            assert torch.equal(a.pred_masks, b.pred_masks)


def assert_export_matches_stock(model, cfg, stock_meta_architecture, masks=False):
    """The exported student of ``model`` loads strictly into the stock meta-architecture and both
    give identical eval output (``model`` is left in eval mode)."""
    from lgd_detectron2.export import student_weights

    weights = student_weights(model.state_dict())
    assert not any(k.startswith("distiller.") for k in weights)
    stock_cfg = cfg.clone()
    stock_cfg.MODEL.META_ARCHITECTURE = stock_meta_architecture
    stock = build_model(stock_cfg)
    assert type(stock).__name__ == stock_meta_architecture
    result = stock.load_state_dict(weights, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    stock.eval()
    inputs = [{k: v for k, v in x.items() if k != "instances"} for x in tiny_batch(seed=3)]
    with torch.no_grad():
        assert_same_detections(model(inputs), stock(inputs), masks=masks)
