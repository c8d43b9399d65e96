"""The shared distillation mechanism: one wrapper meta-architecture per detector family.

A ``Distill*`` meta-architecture *is* the stock student (it subclasses Detectron2's class, so the
student's parameters keep their stock names: ``backbone.*``, ``proposal_generator.*``,
``roi_heads.*``) plus one training-only child module ``distiller`` (the method: LGD, FGFI, ...).

Per family, only small pieces differ (how to run the head on given features):
  * ``head_losses(images, features, gt_instances) -> dict``
  * ``head_inference(batched_inputs, images, features)`` (for LGD's teacher-oracle evaluation)
  * the class count passed to the distiller in ``from_config``
In eval mode the wrapper is exactly the student (``super().forward``), unless the distiller asks
to replace inference (LGD's teacher-oracle evaluation).
"""
import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.utils.registry import Registry

from .schedule import current_iteration

DISTILLER_REGISTRY = Registry("DISTILLER")
DISTILLER_REGISTRY.__doc__ = """
Distillation methods. A distiller is an nn.Module built as ``Distiller(cfg, detector_parts)`` with
``forward(detector, images, features, gt_instances, batched_inputs, iteration) -> dict of losses``
and ``parameters_without_update(detector, iteration)`` (parameters whose gradient the trainer drops
this step).
"""

STUDENT_PREFIXES_DROPPED_ON_EXPORT = ("distiller.",)


def build_distiller(cfg, backbone, num_classes):
    name = cfg.MODEL.DISTILL.METHOD
    if name not in DISTILLER_REGISTRY:
        raise KeyError(
            f"MODEL.DISTILL.METHOD = {name!r} is not a registered distiller "
            f"(known: {sorted(key for key, _ in DISTILLER_REGISTRY)})"
        )
    return DISTILLER_REGISTRY.get(name)(cfg, backbone=backbone, num_classes=num_classes)


class DistillMixin:
    """Training step shared by every family: student losses + the distiller's losses."""

    def forward(self, batched_inputs):
        if not self.training:
            if getattr(self.distiller, "replaces_inference", False):
                return self.distiller.inference(self, batched_inputs)
            return super().forward(batched_inputs)
        iteration = current_iteration()
        images = self.preprocess_image(batched_inputs)
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("distillation training needs 'instances' (ground truth) in every input")
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        losses = self.head_losses(images, features, gt_instances)
        losses.update(
            self.distiller(self, images, features, gt_instances, batched_inputs, iteration)
        )
        return losses

    def parameters_without_update(self, iteration):
        """Parameters whose gradients the trainer sets to None before the optimizer step."""
        return list(self.distiller.parameters_without_update(self, iteration))


@META_ARCH_REGISTRY.register()
class DistillGeneralizedRCNN(DistillMixin, GeneralizedRCNN):
    """Faster/Mask R-CNN student (``GeneralizedRCNN``) with a distiller (``MODEL.DISTILL.METHOD``)."""

    @configurable
    def __init__(self, *, distiller, **kwargs):
        super().__init__(**kwargs)
        self.distiller = distiller

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["distiller"] = build_distiller(cfg, ret["backbone"], cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        return ret

    def head_losses(self, images, features, gt_instances):
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        return {**detector_losses, **proposal_losses}

    def head_inference(self, batched_inputs, images, features):
        """Detections from given features, post-processed like ``GeneralizedRCNN.inference``."""
        proposals, _ = self.proposal_generator(images, features, None)
        results, _ = self.roi_heads(images, features, proposals, None)
        return GeneralizedRCNN._postprocess(results, batched_inputs, images.image_sizes)


def unwrap(model):
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
