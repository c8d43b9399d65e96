"""Self-guided distillation for blur-robust detection: the sharp view of an image teaches the same
network on a motion-blurred copy (Cho et al., IEEE Access 2022; no public code: the design is the
reconstruction of shared/specs/other-skd.md section 1, documented there and here as ours).

``SelfGuidedBlurRCNN`` is a ``GeneralizedRCNN`` (Faster R-CNN) whose backbone is ``DeblurFPN``.
Training inputs come in pairs (``INPUT.BLUR.MODE paired``: ``image`` sharp, ``image_blurred``, same
geometry and boxes). One training step:

  P_sharp, P_blur = FPN(sharp), FPN(blurred)      one backbone pass over both views
  P_deblur        = DBS(P_blur)                   per-level deblurring blocks
  L_det(blurred)  on P_deblur (RPN + box head; stock loss names)
  L_det(sharp)    on P_sharp (names ending "_sharp"; SHARP_DETECTION_LOSS)
  (each weighted by DETECTION_LOSS_WEIGHT, 0.5: the mean over the paired batch's 2N images)
  L_deblur        = mean_l mean_i || P_deblur / |P_deblur|_1 - sg(T_l / |T_l|_1) ||_1
  L_SS            = KL(p_T || p_S) over sampled RoIs (fg and bg halves averaged with equal
                    weight: "balanced") + ALPHA * L1(student, teacher GT-class box deltas) on fg RoIs
  total           = w (L_det(blurred) + L_det(sharp)) + lambda_2 L_deblur + lambda_1 L_SS

T is the teacher: P_sharp of the same network (TEACHER "self") or a frozen detector trained on
sharp images (TEACHER "frozen": conventional distillation with identical losses). sg = stop
gradient: the teacher side never receives gradient from L_deblur or L_SS.

Soft-label alignment between the views' proposals (two-stage caveat of the spec): the student's
RPN proposes on the blurred view and its RoIs are sampled as usual (GT boxes appended); the
teacher's box head is then run on *those same boxes*, pooled from the teacher's sharp pyramid.
Both views have the same geometry, so a box covers the same image region in both, and every
sampled RoI gets a teacher distribution and teacher deltas; the KL replaces the hard-label CE's
missing "dark knowledge" on exactly the RoIs the student trains on. (KL differs from the spec's
soft cross-entropy by the teacher's entropy, a constant: same gradient, and it is 0 at agreement.)

With the self-teacher the soft-label loss does not update the shared box head's own weights (its
gradient stops at the head's input; see ``forward``): our fix of a divergence we measured.

A self-teacher that holds still (MODEL.BLUR_SKD): SELF_TEACHER "ema" / "snapshot" replace the
network's own sharp pass by a moving copy (``MovingTeacher``: backbone + box head, no gradient);
DISTILL_INTO "deblur" lets the distillation losses train the deblurring blocks only (their
input is detached, and the box head's weights are constants in the soft-label pass);
WARMUP_ITERS delays both losses; PAIRED_BN "per_view" runs the backbone once per view, so that
BatchNorm's batch statistics do not mix the views.

Inference is ``GeneralizedRCNN.forward``: backbone (with DBS) + heads on any input, sharp or blurred;
the frozen teacher is not a submodule (never saved, never exported).
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.roi_heads import StandardROIHeads

from ..distill.schedule import current_iteration


def l1_normalised_distance(student, teacher):
    """mean over images of || s / |s|_1 - t / |t|_1 ||_1 for (N, C, H, W) maps; in [0, 2].
    The teacher side is detached here."""
    s = student.flatten(1)
    t = teacher.detach().flatten(1)
    s = s / s.abs().sum(dim=1, keepdim=True).clamp(min=1e-12)
    t = t / t.abs().sum(dim=1, keepdim=True).clamp(min=1e-12)
    return (s - t).abs().sum(dim=1).mean()


def soft_label_losses(student, teacher, gt_classes, num_classes, temperature=1.0):
    """(classification KL, box L1) between the student's and the (detached) teacher's box-predictor
    outputs on the same RoIs. ``student``/``teacher``: (class logits (R, K+1), deltas (R, 4K or 4));
    ``gt_classes``: (R,) with K = background."""
    (s_logits, s_deltas), (t_logits, t_deltas) = student, [t.detach() for t in teacher]
    log_p_s = F.log_softmax(s_logits / temperature, dim=1)
    log_p_t = F.log_softmax(t_logits / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * temperature**2
    foreground = (gt_classes >= 0) & (gt_classes < num_classes)
    halves = [kl[m].mean() for m in (foreground, ~foreground) if m.any()]
    cls_loss = sum(halves) / len(halves) if halves else kl.sum() * 0.0
    if not foreground.any():
        return cls_loss, s_deltas.sum() * 0.0
    fg_classes = gt_classes[foreground]
    rows = torch.arange(len(fg_classes), device=s_deltas.device)

    def gt_class_deltas(deltas):
        deltas = deltas[foreground]
        if deltas.shape[1] == 4:  # class-agnostic regression
            return deltas
        return deltas.view(len(fg_classes), -1, 4)[rows, fg_classes]

    reg_loss = (gt_class_deltas(s_deltas) - gt_class_deltas(t_deltas)).abs().sum(dim=1).mean()
    return cls_loss, reg_loss


def pool_boxes(roi_heads, features, proposals):
    return roi_heads.box_pooler([features[f] for f in roi_heads.box_in_features],
                                [p.proposal_boxes for p in proposals])


def box_predictions(roi_heads, pooled, constant_weights=False):
    """The box head + predictor's (logits, deltas) for pooled RoI features. With
    ``constant_weights`` the gradient reaches ``pooled`` (and what produced it) but not the head's
    own parameters."""
    if not constant_weights:
        return roi_heads.box_predictor(roi_heads.box_head(pooled))
    outputs = pooled
    for module in (roi_heads.box_head, roi_heads.box_predictor):
        weights = {k: v.detach() for k, v in module.named_parameters()}
        outputs = functional_call(module, weights, (outputs,))
    return outputs


class MovingTeacher(nn.Module):
    """A gradient-free copy of the network's backbone and box head, the sharp-view teacher of
    SELF_TEACHER "ema" (updated every iteration) or "snapshot" (copied every ``period``).
    ``initialized`` (a buffer, so checkpoints carry it) is 0 until the first training iteration
    copies the network: a fine-tuning run copies the weights it started from, a resumed run keeps
    the saved teacher. Always in eval mode (its BatchNorm uses its own running statistics)."""

    def __init__(self, backbone, roi_heads, kind, momentum, period):
        super().__init__()
        self.backbone, self.roi_heads = copy.deepcopy(backbone), copy.deepcopy(roi_heads)
        for p in self.parameters():
            p.requires_grad_(False)
        self.kind, self.momentum, self.period = kind, momentum, period
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        self.train(False)

    def train(self, mode=True):
        return super().train(False)

    @torch.no_grad()
    def update(self, student, iteration):
        """Before the step of ``iteration``: copy (first step, snapshot period) or EMA step."""
        pairs = [(getattr(self, part).state_dict(keep_vars=True), getattr(student, part).state_dict(keep_vars=True))
                 for part in ("backbone", "roi_heads")]
        copy_now = not self.initialized or (self.kind == "snapshot" and iteration % self.period == 0)
        if not copy_now and self.kind == "snapshot":
            return
        for mine, theirs in pairs:
            for name, tensor in mine.items():
                source = theirs[name].detach()
                if copy_now or not tensor.is_floating_point() or name.endswith(("running_mean", "running_var")):
                    tensor.copy_(source)  # statistics follow the network (not averaged)
                else:
                    tensor.lerp_(source, 1 - self.momentum)
        self.initialized.fill_(1)


@META_ARCH_REGISTRY.register()
class SelfGuidedBlurRCNN(GeneralizedRCNN):
    @configurable
    def __init__(self, *, frozen_teacher=None, sharp_detection_loss=True, detection_loss_weight=0.5,
                 feature_loss_weight=0.5, soft_label_weight=0.3, soft_label_reg_weight=0.5,
                 temperature=1.0, self_teacher="shared", teacher_momentum=0.99, snapshot_period=50,
                 distill_into="all", warmup_iters=0, paired_bn="joint", **kwargs):
        super().__init__(**kwargs)
        if not hasattr(self.backbone, "deblur_features"):
            raise ValueError(
                "SelfGuidedBlurRCNN needs a backbone with feature deblurring: "
                "MODEL.BACKBONE.NAME 'build_resnet_fpn_deblur_backbone'"
            )
        if not isinstance(self.roi_heads, StandardROIHeads) or self.roi_heads.mask_on:
            raise ValueError("SelfGuidedBlurRCNN supports Faster R-CNN (StandardROIHeads, MASK_ON False)")
        # not a submodule: never in state_dict(), parameters() or train()/eval() (see FGFI)
        object.__setattr__(self, "frozen_teacher", frozen_teacher)
        self.sharp_detection_loss = sharp_detection_loss
        self.detection_loss_weight = detection_loss_weight
        self.feature_loss_weight = feature_loss_weight
        self.soft_label_weight, self.soft_label_reg_weight = soft_label_weight, soft_label_reg_weight
        self.temperature = temperature
        self.distill_into, self.warmup_iters, self.paired_bn = distill_into, warmup_iters, paired_bn
        self.self_teacher = None  # the moving copy (a submodule: checkpoints carry it)
        if frozen_teacher is None and self_teacher != "shared":
            self.self_teacher = MovingTeacher(self.backbone, self.roi_heads, self_teacher,
                                              teacher_momentum, snapshot_period)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        c = cfg.MODEL.BLUR_SKD
        ret.update(
            sharp_detection_loss=c.SHARP_DETECTION_LOSS, detection_loss_weight=c.DETECTION_LOSS_WEIGHT,
            feature_loss_weight=c.FEATURE_LOSS_WEIGHT,
            soft_label_weight=c.SOFT_LABEL_WEIGHT, soft_label_reg_weight=c.SOFT_LABEL_REG_WEIGHT,
            temperature=c.TEMPERATURE, self_teacher=c.SELF_TEACHER, teacher_momentum=c.TEACHER_MOMENTUM,
            snapshot_period=c.SNAPSHOT_PERIOD, distill_into=c.DISTILL_INTO,
            warmup_iters=c.WARMUP_ITERS, paired_bn=c.PAIRED_BN,
        )
        if c.TEACHER == "frozen":
            ret["frozen_teacher"] = build_frozen_teacher(cfg, ret["backbone"])
        return ret

    def pyramids(self, sharp, blurred):
        """(teacher pyramid on the sharp view, student's own sharp pyramid or None, student's
        blurred pyramid before and after the deblurring blocks). With PAIRED_BN "joint" the
        student's views share one backbone pass (one set of BatchNorm batch statistics)."""
        n = len(blurred)
        own_sharp = self.sharp_detection_loss or (self.frozen_teacher is None and self.self_teacher is None)
        if not own_sharp:
            raw_blurred, student_sharp = self.backbone.forward_without_deblur(blurred), None
        elif self.paired_bn == "per_view":
            raw_blurred = self.backbone.forward_without_deblur(blurred)
            student_sharp = self.backbone.forward_without_deblur(sharp)
        else:
            raw = self.backbone.forward_without_deblur(torch.cat([blurred, sharp]))
            raw_blurred = {l: f[:n] for l, f in raw.items()}
            student_sharp = {l: f[n:] for l, f in raw.items()}
        deblurred = self.backbone.deblur_features(raw_blurred)
        if self.frozen_teacher is None and self.self_teacher is None:
            teacher_sharp = student_sharp
        else:
            teacher = self.frozen_teacher if self.frozen_teacher is not None else self.self_teacher
            if next(teacher.parameters()).device != sharp.device:
                teacher.to(sharp.device)
            with torch.no_grad():
                backbone = teacher.backbone
                teacher_sharp = (backbone.forward_without_deblur(sharp) if hasattr(backbone, "forward_without_deblur")
                                 else backbone(sharp))
        return teacher_sharp, student_sharp, raw_blurred, deblurred

    def forward(self, batched_inputs):
        if not self.training:
            return super().forward(batched_inputs)  # the deployed path: backbone with DBS + heads
        if any("image_blurred" not in x or "instances" not in x for x in batched_inputs):
            raise ValueError(
                "SelfGuidedBlurRCNN trains on paired views: every input needs 'image_blurred' and "
                "'instances' (set INPUT.BLUR.MODE 'paired')"
            )
        gt = [x["instances"].to(self.device) for x in batched_inputs]
        sharp = self.preprocess_image(batched_inputs)
        blurred = self.preprocess_image([{"image": x["image_blurred"]} for x in batched_inputs])
        if sharp.tensor.shape != blurred.tensor.shape:
            raise ValueError(
                f"paired views differ in size: sharp {tuple(sharp.tensor.shape)}, "
                f"blurred {tuple(blurred.tensor.shape)}"
            )
        iteration = current_iteration()
        if self.self_teacher is not None:
            self.self_teacher.update(self, iteration)
        teacher_sharp, student_sharp, raw_blurred, deblurred = self.pyramids(sharp.tensor, blurred.tensor)

        # student: the blurred view through DBS, RPN and box head (stock loss names)
        proposals, losses = self.proposal_generator(blurred, deblurred, gt)
        sampled = self.roi_heads.label_and_sample_proposals(proposals, gt)
        pooled = pool_boxes(self.roi_heads, deblurred, sampled)
        student_out = box_predictions(self.roi_heads, pooled)
        losses.update(self.roi_heads.box_predictor.losses(student_out, sampled))

        if self.sharp_detection_loss:
            sharp_proposals, rpn_sharp = self.proposal_generator(sharp, student_sharp, gt)
            _, det_sharp = self.roi_heads(sharp, student_sharp, sharp_proposals, gt)
            losses.update({f"{k}_sharp": v for k, v in {**rpn_sharp, **det_sharp}.items()})
        losses = {k: self.detection_loss_weight * v for k, v in losses.items()}  # detection terms only

        # the distillation losses' student side: the deblurred blurred view, or with DISTILL_INTO
        # "deblur" the deblurring blocks on a detached input (only the blocks learn from them)
        distilled = (deblurred if self.distill_into == "all"
                     else self.backbone.deblur_features({l: f.detach() for l, f in raw_blurred.items()}))
        weight = 0.0 if iteration < self.warmup_iters else 1.0  # zero, not skipped (DDP graph)
        levels = list(self.backbone.deblur)
        losses["loss_deblur_feature"] = weight * self.feature_loss_weight * sum(
            l1_normalised_distance(distilled[l], teacher_sharp[l]) for l in levels) / len(levels)

        teacher = next((t for t in (self.frozen_teacher, self.self_teacher) if t is not None), self)
        with torch.no_grad():  # the teacher's box head on the student's sampled RoIs
            teacher_out = box_predictions(teacher.roi_heads, pool_boxes(teacher.roi_heads, teacher_sharp, sampled))
        # The shared self-teacher *is* the student's box head: a gradient on the head's weights would
        # move the (detached) target as much as the prediction, so the loss could not fall;
        # measured, it drove the box deltas to 1e9 within 40 iterations (2 seeds). So with the
        # shared self-teacher (and with DISTILL_INTO "deblur") the soft labels train the path up to
        # the head, and the head learns from the detection losses only.
        constant_head = teacher is self or self.distill_into == "deblur"
        if constant_head or distilled is not deblurred:
            distilled_pooled = pooled if distilled is deblurred else pool_boxes(self.roi_heads, distilled, sampled)
            student_out = box_predictions(self.roi_heads, distilled_pooled, constant_weights=constant_head)
        cls_loss, reg_loss = soft_label_losses(
            student_out, teacher_out, torch.cat([p.gt_classes for p in sampled]),
            self.roi_heads.num_classes, self.temperature,
        )
        losses["loss_soft_label_cls"] = weight * self.soft_label_weight * cls_loss
        losses["loss_soft_label_reg"] = weight * self.soft_label_weight * self.soft_label_reg_weight * reg_loss
        return losses


def build_frozen_teacher(cfg, student_backbone):
    """The conventional teacher (MODEL.BLUR_SKD.FROZEN_TEACHER): loaded, frozen, checked to give
    pyramids and boxes the student's losses can compare with."""
    from ..config import num_classes_key
    from ..fgfi.distiller import TeacherLoadError, build_teacher

    key = "MODEL.BLUR_SKD.FROZEN_TEACHER"
    # the soft labels use the teacher's heads too: every tensor must load
    teacher, tcfg = build_teacher(cfg, cfg.MODEL.BLUR_SKD.FROZEN_TEACHER, key, required_prefix="")
    if not isinstance(teacher, GeneralizedRCNN) or not isinstance(teacher.roi_heads, StandardROIHeads):
        raise TeacherLoadError(f"{key}: the teacher must be a Faster R-CNN (GeneralizedRCNN)")
    teacher_classes = num_classes_key(tcfg)[1]
    if teacher_classes != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise TeacherLoadError(
            f"{key}: the teacher has {teacher_classes} classes, the student "
            f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES}"
        )
    s_shape, t_shape = student_backbone.output_shape(), teacher.backbone.output_shape()
    for level, spec in s_shape.items():
        t = t_shape.get(level)
        if t is None or (t.channels, t.stride) != (spec.channels, spec.stride):
            raise TeacherLoadError(
                f"{key}: teacher feature '{level}' ({t}) differs from the student's ({spec}); the "
                "feature loss compares them without an adapter"
            )
    for k in ("MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "INPUT.FORMAT"):
        first, second = k.split(".")
        if list(tcfg[first][second]) != list(cfg[first][second]):
            raise TeacherLoadError(f"{key}: the teacher's {k} differs from the student's (the "
                                   "teacher reads the student's normalised sharp images)")
    return teacher
