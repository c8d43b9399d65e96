"""LGD as a distiller of the shared mechanism (spec: shared/specs/lgd.md sections 1-3).

Per training step, on top of the student's detection losses L_det^S:
  T_l = SelfTeacher(GT labels, S_l)                       (the instructive knowledge maps)
  L_det^I = student head losses on T_l, logged as ``*_tea``
  L_distill = LAMBDA * mean over all levels' elements of (IN(Adapter(S_l)) - IN(T_l.detach()))^2
             (LEVEL_WEIGHTING "levels": the mean over levels of each level's mean)
With TEACHER_LOSS_TRAINS_HEAD False (ours) the head is read-only in L_det^I: its gradient reaches
the self-teacher but not the head's weights, which learn from L_det^S alone.
The teacher builds T_l on MODEL.LGD.IN_FEATURES; L_distill uses MODEL.LGD.DISTILL_FEATURES (the
same levels when empty). Before PRE_NONDISTILL_ITERS (and in the last POST_NONDISTILL_ITERS, and
while the teacher guard has switched distillation off) S_l is detached inside L_distill, so only
the adapter learns from it. Before PRE_FREEZE_STUDENT_BACKBONE_ITERS the
bottom-up backbone gets no update (the trainer turns its requires_grad off: no backward through it,
no weight decay, no momentum).
With RECOMPUTE_IN_BACKWARD the self-teacher's refinement convolutions and the adapter keep no
activations for backward and recompute them there (activation checkpointing: less memory, one more
forward of those layers).
"""
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from detectron2.utils.events import get_event_storage

from ..distill.meta_arch import DISTILLER_REGISTRY, head_modules
from ..distill.schedule import DistillSchedule
from .self_teacher import SelfTeacher


def sequential_convs(channels, num_convs=3):
    """The original adapter: Conv3x3 (-> ReLU -> Conv3x3) ..., no ReLU after the last."""
    layers = []
    for i in range(num_convs):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1))
        if i < num_convs - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def instance_norm(x, eps=1e-5):
    """InstanceNorm2d(affine=False) as a formula: per image and channel, zero mean and unit
    variance over the map. Unlike ``F.instance_norm`` in training mode it accepts a 1x1 map (P7 of
    a small image), which it maps to zeros."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps)


def normalized_mse(student_maps, teacher_maps, level_weighting="elements"):
    """MSE of instance-normalised maps. ``"elements"`` (the original): one mean over all elements
    of all levels, so each level weighs by its cell count (P2 holds about 3/4 of them);
    ``"levels"``: the mean of each level's own MSE (every level weighs the same)."""
    sums = [(instance_norm(s) - instance_norm(t)).pow(2).sum() for s, t in zip(student_maps, teacher_maps)]
    counts = [s.numel() for s in student_maps]
    if level_weighting == "levels":
        return sum(total / max(n, 1) for total, n in zip(sums, counts)) / max(len(sums), 1)
    return sum(sums) / max(sum(counts), 1)


def resolve_levels(cfg_levels, output_shape, method):
    levels = list(cfg_levels) or list(output_shape)
    unknown = [l for l in levels if l not in output_shape]
    if unknown:
        raise ValueError(
            f"MODEL.{method}.IN_FEATURES has {unknown}, not produced by the backbone "
            f"(it produces {list(output_shape)})"
        )
    channels = {output_shape[l].channels for l in levels}
    if len(channels) != 1:
        raise ValueError(f"{method} needs equal channels on all levels {levels}; got {channels}")
    return levels, channels.pop()


@contextmanager
def read_only_parameters(modules):
    """Inside: every parameter of ``modules`` is a detached view of itself (same storage and
    values), so a loss computed inside sends gradients to its inputs but none to these weights.
    The parameters are restored on exit."""
    swapped = []
    try:
        for module in modules:
            for sub in module.modules():
                for name, param in list(sub._parameters.items()):
                    if param is not None:
                        swapped.append((sub, name, param))
                        sub._parameters[name] = param.detach()
        yield
    finally:
        # last swapped first: a module reached twice gets its own parameter back, not a view
        for sub, name, param in reversed(swapped):
            sub._parameters[name] = param


@DISTILLER_REGISTRY.register()
class LGD(nn.Module):
    def __init__(self, cfg, *, backbone, num_classes, head_in_features):
        super().__init__()
        c = cfg.MODEL.LGD
        if not hasattr(backbone, "bottom_up"):
            raise ValueError(
                f"LGD needs an FPN backbone (MODEL.BACKBONE.NAME = {cfg.MODEL.BACKBONE.NAME!r} "
                "has no bottom-up/FPN split); use e.g. build_resnet_fpn_backbone"
            )
        shapes = backbone.output_shape()
        self.levels, channels = resolve_levels(c.IN_FEATURES, shapes, "LGD")
        self.distill_levels = list(c.DISTILL_FEATURES) or self.levels
        not_built = [l for l in self.distill_levels if l not in self.levels]
        if not_built:
            raise ValueError(f"MODEL.LGD.DISTILL_FEATURES has {not_built}, for which the self-teacher "
                             f"builds no map (its levels: {self.levels})")
        self.loss_weight = c.LAMBDA
        self.level_weighting = c.LEVEL_WEIGHTING
        self.eval_teacher = c.EVAL_TEACHER
        self.teacher_loss_trains_head = c.TEACHER_LOSS_TRAINS_HEAD
        self.schedule = DistillSchedule(
            max_iter=cfg.SOLVER.MAX_ITER,
            pre_nondistill=c.PRE_NONDISTILL_ITERS,
            post_nondistill=c.POST_NONDISTILL_ITERS,
            freeze_backbone=c.PRE_FREEZE_STUDENT_BACKBONE_ITERS,
        )
        self.self_teacher = SelfTeacher(
            channels=channels,
            strides={l: shapes[l].stride for l in self.levels},
            num_classes=num_classes,
            num_heads=c.NUM_HEADS,
            add_context_box=c.ADD_CONTEXT_BOX,
            detach_appearance=c.DETACH_APPEARANCE_EMBED,
            recompute_in_backward=c.RECOMPUTE_IN_BACKWARD,
            interact_pattern=c.INTERACT_PATTERN,
            class_identity=c.CLASS_IDENTITY,
            region_mask=c.REGION_MASK,
        )
        self.adapter = sequential_convs(channels)
        # Set by the teacher guard (lgd/guard.py) when the teacher's detection losses were not
        # below the student's over its last period; saved in checkpoints (extra state).
        self.guard_switched_off = False
        self.recompute_in_backward = c.RECOMPUTE_IN_BACKWARD

    def get_extra_state(self):
        return torch.tensor(self.guard_switched_off)

    def set_extra_state(self, state):
        self.guard_switched_off = bool(state)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the teacher guard existed: guard off
        state_dict.setdefault(prefix + "_extra_state", torch.tensor(False))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def replaces_inference(self):
        return self.eval_teacher

    def teacher_features(self, features, gt_instances, image_sizes):
        """Teacher maps for the chosen levels; other levels the head needs keep the (detached)
        student features, so the head sees a complete pyramid."""
        maps = self.self_teacher({l: features[l] for l in self.levels}, gt_instances, image_sizes)
        return {k: maps.get(k, v.detach()) for k, v in features.items()}

    def forward(self, detector, images, features, gt_instances, batched_inputs, iteration):
        teacher = self.teacher_features(features, gt_instances, images.image_sizes)
        head = nullcontext() if self.teacher_loss_trains_head else read_only_parameters(head_modules(detector))
        with get_event_storage().name_scope("tea"), head:
            teacher_losses = detector.head_losses(images, teacher, gt_instances)
        losses = {k + "_tea": v for k, v in teacher_losses.items()}

        distill_on = self.schedule.distill_on(iteration) and not self.guard_switched_off
        student = [features[l] if distill_on else features[l].detach() for l in self.distill_levels]
        losses["loss_distill"] = self.loss_weight * normalized_mse(
            [self.adapt(s) for s in student], [teacher[l].detach() for l in self.distill_levels],
            self.level_weighting,
        )
        return losses

    def adapt(self, student_map):
        if self.recompute_in_backward and torch.is_grad_enabled():
            return checkpoint(self.adapter, student_map, use_reentrant=False)
        return self.adapter(student_map)

    def parameters_without_update(self, detector, iteration):
        if self.schedule.backbone_frozen(iteration):
            return detector.backbone.bottom_up.parameters()
        return []

    @torch.no_grad()
    def inference(self, detector, batched_inputs):
        """Teacher oracle: detections of the student head on the teacher maps (needs GT)."""
        if any("instances" not in x for x in batched_inputs):
            raise ValueError(
                "MODEL.LGD.EVAL_TEACHER needs ground truth at test time; the test loader must "
                "keep annotations (tools/train_net.py does this when EVAL_TEACHER is on)"
            )
        images = detector.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(detector.device) for x in batched_inputs]
        features = detector.backbone(images.tensor)
        teacher = self.teacher_features(features, gt_instances, images.image_sizes)
        return detector.head_inference(batched_inputs, images, teacher)
