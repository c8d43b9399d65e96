"""UDFA as a distiller of the shared mechanism (spec: shared/specs/other-skd.md section 2).

One training step, student S, frozen teacher T (a trained checkpoint of the same detector), clean
images x, ground truth y:

  1. clean pass: P = S.fpn(x) (kept with its graph), L_clean = S.losses(P, y)
  2. attack:  x_adv = signed-gradient step(s) on x against the total detection loss (input
     gradient only); without AUX_BN the first step reuses L_clean's graph; with AUX_BN it is
     crafted through the auxiliary BatchNorm (ATTACK.THROUGH_AUX_BN, AdvProp / the release's mixbn)
  3. adversarial pass (auxiliary BatchNorm with AUX_BN): P_adv = S.fpn(x_adv), L_adv
  4. teacher: Q = T.fpn(x) (no grad)
  5. decoupled alignment D(A, B) = mean over levels of FG_WEIGHT * fg_l + BG_WEIGHT * bg_l,
     fg_l = sum_{fg cells, channels} (A - B)^2 / (8 * max(1, #fg cells * C)), bg_l likewise; each
     GT box is fg on one level (``box_levels``)
  loss = w_c L_clean + w_a L_adv + w_kdfa D(P_adv, Q) + w_ssfa D(P_adv, sg(P)) + w_ck D(P, Q)

Deviations from the released code: clean-KD uses the clean pass's maps (the release runs a third,
identical clean forward); the box-to-level rule is the RoI-level rule of the aligned levels. No
teacher (KDFA and CLEAN_KD weights 0) is the purely self-distilled variant (SSFA only).
"""
import logging

import torch
from torch import nn

from ..distill.meta_arch import DISTILLER_REGISTRY
from ..fgfi.distiller import TeacherLoadError, build_teacher, teacher_sees_flipped_channels
from .attack import attack_settings, features_and_losses, signed_gradient_attack, with_images
from .aux_bn import add_auxiliary_bn, adversarial_bn
from .config import uses_teacher

logger = logging.getLogger(__name__)


def box_levels(boxes, num_levels, finest_scale):
    """Index of the aligned level of each box (N, 4): floor(log2(sqrt(area) / finest_scale)),
    clamped to [0, num_levels - 1] (Detectron2's ROIPooler rule when the levels are p2-p5)."""
    side = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)).sqrt()
    return torch.floor(torch.log2(side / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


def foreground_masks(gt_instances, grid_sizes, strides, finest_scale):
    """One float (B, 1, H_l, W_l) mask per level: 1 on the cells that a box of that level's
    image covers (cells floor(x1/s) .. ceil(x2/s) - 1, at least one), on its level only."""
    device = gt_instances[0].gt_boxes.tensor.device
    boxes = torch.cat([inst.gt_boxes.tensor for inst in gt_instances]).float()
    owner = torch.repeat_interleave(
        torch.arange(len(gt_instances), device=device),
        torch.tensor([len(inst) for inst in gt_instances], device=device))
    level = box_levels(boxes, len(strides), finest_scale)
    masks = []
    for l, ((h, w), s) in enumerate(zip(grid_sizes, strides)):
        mask = torch.zeros((len(gt_instances), 1, h, w), device=device)
        mine = level == l
        if mine.any():
            b = boxes[mine] / s
            x1, y1 = b[:, 0].floor(), b[:, 1].floor()
            x2, y2 = torch.max(b[:, 2].ceil(), x1 + 1), torch.max(b[:, 3].ceil(), y1 + 1)
            xs = torch.arange(w, device=device)[None]
            ys = torch.arange(h, device=device)[None]
            in_x = (xs >= x1[:, None]) & (xs < x2[:, None])  # (G, W)
            in_y = (ys >= y1[:, None]) & (ys < y2[:, None])  # (G, H)
            covered = (in_y[:, :, None] & in_x[:, None, :]).flatten(1).float()  # (G, H*W)
            per_image = torch.zeros((len(gt_instances), h * w), device=device)
            per_image.index_add_(0, owner[mine], covered)
            mask = (per_image > 0).float().view(len(gt_instances), 1, h, w)
        masks.append(mask)
    return masks


def decoupled_alignment(student, target, masks, fg_weight, bg_weight):
    """Mean over levels of fg_weight * fg_l + bg_weight * bg_l (module docstring)."""
    total = student[0].new_zeros(())
    for s, t, m in zip(student, target, masks):
        squared = (s - t).pow(2)
        channels = s.shape[1]
        fg_cells, bg_cells = m.sum() * channels, (1 - m).sum() * channels
        fg = (squared * m).sum() / (8 * fg_cells.clamp(min=1))
        bg = (squared * (1 - m)).sum() / (8 * bg_cells.clamp(min=1))
        total = total + fg_weight * fg + bg_weight * bg
    return total / len(student)


@DISTILLER_REGISTRY.register()
class UDFA(nn.Module):
    replaces_inference = False
    runs_the_student = True  # the step has a clean and an adversarial student pass

    def __init__(self, cfg, *, backbone, num_classes, head_in_features):
        super().__init__()
        c = cfg.MODEL.UDFA
        shapes = backbone.output_shape()
        self.levels = list(c.IN_FEATURES) or list(head_in_features)
        unknown = [l for l in self.levels if l not in shapes]
        if unknown:
            raise ValueError(f"MODEL.UDFA.IN_FEATURES: {unknown} are not backbone outputs "
                             f"({sorted(shapes)})")
        self.strides = [shapes[l].stride for l in self.levels]
        self.finest_scale = c.FINEST_SCALE
        self.weights = {k: float(c[k]) for k in (
            "CLEAN_LOSS_WEIGHT", "ADV_LOSS_WEIGHT", "KDFA_WEIGHT", "SSFA_WEIGHT", "CLEAN_KD_WEIGHT")}
        self.fg_weight, self.bg_weight = c.FG_WEIGHT, c.BG_WEIGHT
        self.attack = attack_settings(c.ATTACK)
        self.use_aux_bn = c.AUX_BN
        # the first attack step reuses the clean pass (clean BN) unless the attack is crafted
        # through the auxiliary BN
        self.attack_reuses_clean_pass = not (c.AUX_BN and c.ATTACK.THROUGH_AUX_BN)
        self.teacher, self.flip_channels = None, False
        if uses_teacher(cfg):
            teacher, tcfg = build_teacher(cfg, node=c.TEACHER, key="MODEL.UDFA.TEACHER")
            t_shapes = teacher.backbone.output_shape()
            for l, s in zip(self.levels, self.strides):
                if l not in t_shapes or t_shapes[l].stride != s or t_shapes[l].channels != shapes[l].channels:
                    raise TeacherLoadError(
                        f"UDFA teacher feature '{l}' ({t_shapes.get(l)}) does not match the "
                        f"student's ({shapes[l]}): the teacher must be the same detector")
            object.__setattr__(self, "teacher", teacher)  # hidden, as FGFI's: never saved or trained
            self.flip_channels = teacher_sees_flipped_channels(cfg, tcfg, "MODEL.UDFA.TEACHER")

    def prepare_student(self, detector):
        if not self.use_aux_bn:
            return
        added = add_auxiliary_bn(detector)
        if added == 0:
            raise ValueError(
                "MODEL.UDFA.AUX_BN is on but the student has no trainable BatchNorm (e.g. "
                "MODEL.RESNETS.NORM 'FrozenBN'); turn AUX_BN off or use 'BN' / 'SyncBN'")
        logger.info("UDFA: %d BatchNorm layers got an auxiliary BatchNorm for adversarial inputs", added)

    def parameters_without_update(self, detector, iteration):
        return []

    @staticmethod
    def _pass(detector, batched_inputs, images, gt_instances):
        """(features, losses) of the student on ``images`` in place of the inputs' own."""
        return features_and_losses(detector, with_images(batched_inputs, images), gt_instances)

    def training_losses(self, detector, batched_inputs, gt_instances, iteration):
        w = self.weights
        raw = [x["image"].to(detector.device).float() for x in batched_inputs]
        # 1. clean pass; its graph is kept when the clean losses or clean-KD need it, and built at
        # all only for them or for the attack's first step
        needs_clean_graph = w["CLEAN_LOSS_WEIGHT"] > 0 or (self.teacher is not None and w["CLEAN_KD_WEIGHT"] > 0)
        reuse = self.attack_reuses_clean_pass
        clean_features, first_step = None, None
        if needs_clean_graph or reuse or w["SSFA_WEIGHT"] > 0:
            leaves = [r.detach().clone().requires_grad_(reuse) for r in raw]
            with torch.set_grad_enabled(needs_clean_graph or reuse):
                clean_features, clean_losses = self._pass(detector, batched_inputs, leaves, gt_instances)
            if reuse:
                first_step = (leaves, sum(clean_losses.values()))

        # 2. attack against the total detection loss; every step through the adversarial BN state
        # with AUX_BN (the release's mixbn switches to it before the attack's forward, so that
        # forward also updates the auxiliary BN's running statistics, as here), except a first
        # step that reuses the clean pass
        def loss_of(images):
            with adversarial_bn(detector, self.use_aux_bn):
                return sum(self._pass(detector, batched_inputs, images, gt_instances)[1].values())

        adversarial = signed_gradient_attack(loss_of, raw, **self.attack, first_step=first_step,
                                             keep_first_graph=needs_clean_graph)
        if clean_features is not None and not needs_clean_graph:
            clean_features = {k: v.detach() for k, v in clean_features.items()}
        # 3. adversarial pass
        with adversarial_bn(detector, self.use_aux_bn):
            adv_features, adv_losses = self._pass(detector, batched_inputs, adversarial, gt_instances)

        losses = {f"{k}_adv": w["ADV_LOSS_WEIGHT"] * v for k, v in adv_losses.items()}
        if w["CLEAN_LOSS_WEIGHT"] > 0:
            losses.update({f"{k}_clean": w["CLEAN_LOSS_WEIGHT"] * v for k, v in clean_losses.items()})
        student_clean = [clean_features[l] for l in self.levels] if clean_features is not None else None
        student_adv = [adv_features[l] for l in self.levels]
        masks = foreground_masks(gt_instances, [f.shape[-2:] for f in student_adv], self.strides,
                                 self.finest_scale)

        def align(a, b):
            return decoupled_alignment(a, b, masks, self.fg_weight, self.bg_weight)

        if w["SSFA_WEIGHT"] > 0:
            losses["loss_udfa_ssfa"] = w["SSFA_WEIGHT"] * align(student_adv, [f.detach() for f in student_clean])
        if self.teacher is not None:
            teacher_maps = self._teacher_maps(batched_inputs, raw)
            if w["KDFA_WEIGHT"] > 0:
                losses["loss_udfa_kdfa"] = w["KDFA_WEIGHT"] * align(student_adv, teacher_maps)
            if w["CLEAN_KD_WEIGHT"] > 0:
                losses["loss_udfa_clean_kd"] = w["CLEAN_KD_WEIGHT"] * align(student_clean, teacher_maps)
        return losses

    @torch.no_grad()
    def _teacher_maps(self, batched_inputs, raw):
        teacher = self.teacher
        if teacher.device != raw[0].device:
            teacher.to(raw[0].device)
        images = [r.flip(0) for r in raw] if self.flip_channels else raw
        features = teacher.backbone(teacher.preprocess_image(with_images(batched_inputs, images)).tensor)
        return [features[l] for l in self.levels]
