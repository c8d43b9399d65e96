"""The shared distillation mechanism: one wrapper meta-architecture per detector family.

A ``Distill*`` meta-architecture *is* the stock student (it subclasses Detectron2's class, so the
student's parameters keep their stock names: ``backbone.*``, ``proposal_generator.*``,
``roi_heads.*``) plus one training-only child module ``distiller`` (the method: LGD, FGFI, ...).

Per family, only small pieces differ (how to run the head on given features):
  * ``head_inference(batched_inputs, images, features)`` (for LGD's teacher-oracle evaluation)
  * ``imitation_anchor_generator`` (the anchors FGFI's imitation mask is computed from)
  * the class count and head levels passed to the distiller in ``from_config``
Families: ``DistillGeneralizedRCNN`` (Faster and Mask R-CNN), ``DistillRetinaNet``, ``DistillFCOS``;
the two dense detectors share ``DenseHeadMixin``. ``head_losses`` (the detection losses from given
features) is one function for all of them and for the stock classes. Each exports to the stock meta-architecture of
its name without "Distill" (``tools/export_student.py``).
In eval mode the wrapper is exactly the student (``super().forward``), unless the distiller asks
to replace inference (LGD's teacher-oracle evaluation). A distiller that sees other views of the
input (UDFA's adversarial images) runs the whole training step itself (``runs_the_student``), and
one that adds modules to the student (UDFA's auxiliary BatchNorm) does so in ``prepare_student``,
before the optimizer is built.
"""
import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, RetinaNet
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.utils.registry import Registry

from ..config import num_classes_key
from ..fcos import FCOS

from .schedule import current_iteration

DISTILLER_REGISTRY = Registry("DISTILLER")
DISTILLER_REGISTRY.__doc__ = """
Distillation methods. A distiller is an nn.Module built as ``Distiller(cfg, detector_parts)`` with
``forward(detector, images, features, gt_instances, batched_inputs, iteration) -> dict of losses``
(``features``: dict level -> tensor, the student's backbone output)
and ``parameters_without_update(detector, iteration)`` (parameters whose gradient the trainer drops
this step). Optional: ``prepare_student(detector)`` (called once when the student is built) and
``runs_the_student = True`` with ``training_losses(detector, batched_inputs, gt_instances,
iteration) -> dict`` (the distiller computes the student's losses too, e.g. on other views).
"""

STUDENT_PREFIXES_DROPPED_ON_EXPORT = ("distiller.", "self_teacher.")  # the latter: blur self-guided KD
# Training-only modules inside the student (UDFA's auxiliary BatchNorm), by state-dict name part.
STUDENT_PARTS_DROPPED_ON_EXPORT = (".aux_bn.",)


def head_losses(detector, images, features, gt_instances):
    """The detector's own training losses computed from given ``features`` (dict level -> map):
    RPN + RoI heads for ``GeneralizedRCNN``, the dense head's losses for RetinaNet / FCOS. The
    detector must be in training mode."""
    if isinstance(detector, GeneralizedRCNN):
        proposals, proposal_losses = detector.proposal_generator(images, features, gt_instances)
        _, detector_losses = detector.roi_heads(images, features, proposals, gt_instances)
        return {**detector_losses, **proposal_losses}
    if isinstance(detector, DenseDetector):
        levels = [features[f] for f in detector.head_in_features]
        return detector.forward_training(images, levels, detector.head(levels), gt_instances)
    raise TypeError(f"{type(detector).__name__} is neither a GeneralizedRCNN nor a dense detector")


def head_modules(detector):
    """The modules ``head_losses`` runs: RPN and RoI heads, or the dense head."""
    if isinstance(detector, GeneralizedRCNN):
        return [detector.proposal_generator, detector.roi_heads]
    if isinstance(detector, DenseDetector):
        return [detector.head]
    raise TypeError(f"{type(detector).__name__} is neither a GeneralizedRCNN nor a dense detector")


def build_distiller(cfg, backbone, head_in_features):
    """The distiller of ``MODEL.DISTILL.METHOD`` for a student with this backbone, whose head
    reads ``head_in_features`` (e.g. the RPN's levels, or RetinaNet's)."""
    name = cfg.MODEL.DISTILL.METHOD
    if name not in DISTILLER_REGISTRY:
        raise KeyError(
            f"MODEL.DISTILL.METHOD = {name!r} is not a registered distiller "
            f"(known: {sorted(key for key, _ in DISTILLER_REGISTRY)})"
        )
    return DISTILLER_REGISTRY.get(name)(
        cfg, backbone=backbone, num_classes=num_classes_key(cfg)[1],
        head_in_features=list(head_in_features),
    )


class DistillMixin:
    """Construction and training step shared by every family: student losses + the distiller's
    losses. A family class lists ``DistillMixin`` first, then the stock class, and says which
    levels its head reads (``levels_read_by_head``)."""

    @configurable
    def __init__(self, *, distiller, **kwargs):
        super().__init__(**kwargs)
        self.distiller = distiller
        if hasattr(distiller, "prepare_student"):
            distiller.prepare_student(self)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["distiller"] = build_distiller(cfg, ret["backbone"], cls.levels_read_by_head(cfg))
        return ret

    def forward(self, batched_inputs):
        if not self.training:
            if getattr(self.distiller, "replaces_inference", False):
                return self.distiller.inference(self, batched_inputs)
            return super().forward(batched_inputs)
        iteration = current_iteration()
        if any("instances" not in x for x in batched_inputs):
            raise ValueError("distillation training needs 'instances' (ground truth) in every input")
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        if getattr(self.distiller, "runs_the_student", False):
            return self.distiller.training_losses(self, batched_inputs, gt_instances, iteration)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        losses = self.head_losses(images, features, gt_instances)
        losses.update(
            self.distiller(self, images, features, gt_instances, batched_inputs, iteration)
        )
        return losses

    def head_losses(self, images, features, gt_instances):
        return head_losses(self, images, features, gt_instances)

    def parameters_without_update(self, iteration):
        """Parameters whose gradients the trainer sets to None before the optimizer step."""
        return list(self.distiller.parameters_without_update(self, iteration))


@META_ARCH_REGISTRY.register()
class DistillGeneralizedRCNN(DistillMixin, GeneralizedRCNN):
    """Faster/Mask R-CNN student (``GeneralizedRCNN``) with a distiller (``MODEL.DISTILL.METHOD``)."""

    @staticmethod
    def levels_read_by_head(cfg):
        return cfg.MODEL.RPN.IN_FEATURES

    @property
    def imitation_anchor_generator(self):
        return self.proposal_generator.anchor_generator

    def head_inference(self, batched_inputs, images, features):
        """Detections from given features, post-processed like ``GeneralizedRCNN.inference``."""
        proposals, _ = self.proposal_generator(images, features, None)
        results, _ = self.roi_heads(images, features, proposals, None)
        return GeneralizedRCNN._postprocess(results, batched_inputs, images.image_sizes)


class DenseHeadMixin:
    """Head pieces of Detectron2's dense detectors (``DenseDetector``: RetinaNet, FCOS): the head
    runs on the levels ``head_in_features`` and its own decoding does the rest."""

    def head_inference(self, batched_inputs, images, features):
        """Detections from given features, post-processed like ``DenseDetector.forward``."""
        levels = [features[f] for f in self.head_in_features]
        results = self.forward_inference(images, levels, self.head(levels))
        return [
            {"instances": detector_postprocess(r, x.get("height", size[0]), x.get("width", size[1]))}
            for r, x, size in zip(results, batched_inputs, images.image_sizes)
        ]


@META_ARCH_REGISTRY.register()
class DistillRetinaNet(DistillMixin, DenseHeadMixin, RetinaNet):
    """RetinaNet student with a distiller. LGD's teacher maps go through the student's own
    RetinaNet head and focal/box losses (spec 2.5); FGFI's mask comes from RetinaNet's anchors."""

    @staticmethod
    def levels_read_by_head(cfg):
        return cfg.MODEL.RETINANET.IN_FEATURES

    @property
    def imitation_anchor_generator(self):
        return self.anchor_generator


@META_ARCH_REGISTRY.register()
class DistillFCOS(DistillMixin, DenseHeadMixin, FCOS):
    """FCOS student (``lgd_detectron2.fcos.FCOS``) with a distiller. FCOS is anchor-free, so it
    has no ``imitation_anchor_generator`` and FGFI refuses it."""

    @staticmethod
    def levels_read_by_head(cfg):
        return cfg.MODEL.FCOS.IN_FEATURES


def unwrap(model):
    """The model inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
