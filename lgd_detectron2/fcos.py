"""FCOS from YAML configs.

Detectron2 v0.6 ships an FCOS model (``detectron2.modeling.meta_arch.fcos``) but only builds it
from LazyConfig Python files: it has no ``from_config`` and no ``MODEL.FCOS`` keys. This module
adds both, with the defaults of Detectron2's own ``configs/common/models/fcos.py`` (GN head of 4
convs, focal loss, centre sampling radius 1.5, GIoU box loss, score threshold 0.2), and registers
the result as meta-architecture ``"FCOS"`` (unless a newer Detectron2 already registers one).
It also accepts images without objects, on which v0.6's anchor matching fails (IndexError).
"""
import torch

from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch.fcos import FCOS as _StockFCOS
from detectron2.modeling.meta_arch.fcos import FCOSHead
from detectron2.structures import Boxes, Instances

from .compat import group_norm_32

__all__ = ["add_fcos_config", "FCOS"]


def add_fcos_config(cfg):
    """Add MODEL.FCOS (in place) with Detectron2's FCOS defaults."""
    _C = cfg
    _C.MODEL.FCOS = CN()
    _C.MODEL.FCOS.NUM_CLASSES = 80
    _C.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    _C.MODEL.FCOS.NUM_CONVS = 4
    _C.MODEL.FCOS.NORM = "GN"
    _C.MODEL.FCOS.PRIOR_PROB = 0.01
    _C.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    _C.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    _C.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0
    _C.MODEL.FCOS.SCORE_THRESH_TEST = 0.2
    _C.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    _C.MODEL.FCOS.NMS_THRESH_TEST = 0.6
    return cfg


class FCOS(_StockFCOS):
    """Detectron2's FCOS, buildable from a YAML config (``MODEL.META_ARCHITECTURE: "FCOS"``)."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.FCOS
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in c.IN_FEATURES if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.FCOS.IN_FEATURES has {missing}, not produced by the backbone "
                f"(it produces {list(shapes)}); FCOS uses p3-p7 of build_retinanet_resnet_fpn_backbone"
            )
        channels = shapes[c.IN_FEATURES[0]].channels
        # "GN" as a callable: v0.6's RetinaNetHead (FCOSHead's base) cannot take the string
        norm = group_norm_32 if c.NORM == "GN" else c.NORM
        head = FCOSHead(
            input_shape=[ShapeSpec(channels=channels)] * len(c.IN_FEATURES),
            conv_dims=[channels] * c.NUM_CONVS,
            num_classes=c.NUM_CLASSES,
            prior_prob=c.PRIOR_PROB,
            norm=norm,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": list(c.IN_FEATURES),
            "num_classes": c.NUM_CLASSES,
            "center_sampling_radius": c.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": c.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": c.FOCAL_LOSS_GAMMA,
            "test_score_thresh": c.SCORE_THRESH_TEST,
            "test_topk_candidates": c.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": c.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @torch.no_grad()
    def label_anchors(self, anchors, gt_instances):
        """The stock FCOS rule; an image without objects gets background everywhere (its target
        boxes are the anchor boxes themselves, unused by the losses, which only read positives).
        Detectron2 v0.6 returns the target boxes as ``Boxes``, later versions as tensors: the
        filled-in images follow the stock type."""
        with_objects = [g for g in gt_instances if len(g) > 0]
        all_anchors = Boxes.cat(anchors).tensor
        if not with_objects:  # learn the stock output type from one throw-away labelling
            probe = Instances(gt_instances[0].image_size)
            probe.gt_boxes = Boxes(all_anchors[:1].clone())
            probe.gt_classes = torch.zeros(1, dtype=torch.long, device=all_anchors.device)
            stock = super().label_anchors(anchors, [probe])
            labelled = None
        else:
            stock = super().label_anchors(anchors, with_objects)
            labelled = iter(zip(*stock))
        as_boxes = isinstance(stock[1][0], Boxes)
        labels, boxes = [], []
        for gt in gt_instances:
            if len(gt) > 0:
                label, box = next(labelled)
            else:
                label = torch.full((len(all_anchors),), self.num_classes, dtype=torch.long,
                                   device=all_anchors.device)
                box = Boxes(all_anchors.clone()) if as_boxes else all_anchors.clone()
            labels.append(label)
            boxes.append(box)
        return labels, boxes

if "FCOS" not in META_ARCH_REGISTRY:
    META_ARCH_REGISTRY.register(FCOS)
