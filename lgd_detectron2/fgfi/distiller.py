"""FGFI (Wang et al., "Distilling Object Detectors with Fine-grained Feature Imitation", CVPR 2019)
on FPN, as a distiller of the shared mechanism (spec: shared/specs/fgfi.md section 3).

  t_l = frozen teacher's FPN features (teacher built from its own YAML + weights)
  I_l = imitation mask from the student's anchors (RPN, or RetinaNet) (see ``imitation_masks``)
  L_imit = sum_l sum_{b,h,w} I_l * sum_c (adapter_l(s_l) - t_l)^2 / (2 * max(1, N_p)),
  N_p = positive locations of all levels and images; loss = LOSS_WEIGHT * L_imit, weight 0 during
  the first WARMUP_ITERS iterations.

The teacher is *not* a registered submodule: it never appears in ``state_dict()`` (so neither in
checkpoints nor in the ImageNet-weights loading of the student), in ``parameters()`` (so neither in
the optimizer nor in DDP's gradient sync), and ``model.train()`` never reaches it (it stays in
eval mode). It is built on the student's device and follows the features' device.
"""
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import pairwise_iou

from ..config import num_classes_key
from .config import check_fgfi_has_anchors
from ..distill.meta_arch import DISTILLER_REGISTRY
from ..distill.schedule import DistillSchedule

logger = logging.getLogger(__name__)


class TeacherLoadError(RuntimeError):
    pass


def imitation_masks(anchors_per_level, grid_sizes, gt_instances, psi, level_assignment="all"):
    """Boolean imitation masks, one (B, H_l, W_l) tensor per level.

    For each GT box g: IoU with every anchor; M_g = its best IoU, over all levels
    (``"all"``: the paper's "all anchors" applied to the whole pyramid, which assigns each box to
    the levels whose anchors fit it) or over each level separately (``"per_level"``). A location is
    positive if any of its anchors has IoU > psi * M_g for some GT of its image (strict >).
    """
    num_images = len(gt_instances)
    device = anchors_per_level[0].tensor.device
    gt_boxes = [inst.gt_boxes.to(device) for inst in gt_instances]
    counts = [len(b) for b in gt_boxes]
    out = [torch.zeros((num_images, h, w), dtype=torch.bool, device=device) for h, w in grid_sizes]
    if sum(counts) == 0:
        return out
    all_gt = type(gt_boxes[0]).cat(gt_boxes)
    image_of_gt = torch.repeat_interleave(torch.arange(num_images, device=device),
                                          torch.tensor(counts, device=device))
    owner = F.one_hot(image_of_gt, num_images).float()  # (G, B)
    ious = [pairwise_iou(a, all_gt) for a in anchors_per_level]  # (H*W*A, G) per level
    # IoU of an image's anchors with another image's boxes does not matter: owner masks it out.
    if level_assignment == "all":
        best = torch.stack([iou.max(dim=0).values for iou in ious]).max(dim=0).values
        thresholds = [psi * best] * len(ious)
    elif level_assignment == "per_level":
        thresholds = [psi * iou.max(dim=0).values for iou in ious]
    else:
        raise ValueError(f"MODEL.FGFI.LEVEL_ASSIGNMENT = {level_assignment!r}; use 'all' or 'per_level'")
    for l, (iou, thr, (h, w)) in enumerate(zip(ious, thresholds, grid_sizes)):
        hit = (iou > thr[None, :]).float()  # (H*W*A, G)
        per_image = (hit @ owner) > 0  # (H*W*A, B): an anchor hits some GT of that image
        out[l] = per_image.t().reshape(num_images, h, w, -1).any(dim=-1)
    return out


def masked_imitation_loss(adapted, teacher, masks):
    """sum of I * sum_c (adapted - teacher)^2 over levels / (2 * max(1, N_p)); 0 (not NaN) if N_p = 0."""
    total = adapted[0].new_zeros(())
    positives = adapted[0].new_zeros(())  # kept on the device: no host sync per level
    for s, t, m in zip(adapted, teacher, masks):
        m = m.to(s.dtype)
        total = total + ((s - t).pow(2).sum(dim=1) * m).sum()
        positives = positives + m.sum()
    return total / (2.0 * positives.clamp(min=1)), positives


def resolve_path(path):
    """A relative path as given (from the working directory), else from the repository root."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidate = os.path.join(repo_root, path)
    return candidate if os.path.exists(candidate) else path


def deployed_meta_architecture(name):
    """The stock meta-architecture a training wrapper deploys as (the teacher is built as it)."""
    if name == "SelfGuidedBlurRCNN":
        return "GeneralizedRCNN"
    return name[len("Distill"):] if name.startswith("Distill") else name


def read_weights(path):
    """The state dict of a Detectron2 checkpoint: our/Detectron2's ``.pth`` ({"model": ...}) or a
    model-zoo ``.pkl`` ({"model": numpy arrays}), as a dict of tensors."""
    if path.endswith(".pkl"):
        import pickle

        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)  # as our checkpoints load
    weights = data.get("model", data) if isinstance(data, dict) else data
    return {k: torch.as_tensor(v) for k, v in weights.items()}


def teacher_sees_flipped_channels(cfg, tcfg, key):
    """True if the teacher's INPUT.FORMAT is the student's with the colour channels reversed (RGB
    vs BGR: the teacher's input is flipped); a clear error for other differences. Pixel
    normalisation needs no check where the teacher normalises with its own MODEL.PIXEL_MEAN/STD."""
    student, teacher = cfg.INPUT.FORMAT, tcfg.INPUT.FORMAT
    if student == teacher:
        return False
    if {student, teacher} == {"RGB", "BGR"}:
        return True
    raise TeacherLoadError(f"{key}: the teacher's INPUT.FORMAT {teacher!r} cannot be made from the "
                           f"student's {student!r}")


def build_teacher(cfg, node=None, key="MODEL.FGFI.TEACHER", required_prefix="backbone."):
    """A frozen teacher detector built from its own YAML with a fresh config, loaded, in eval mode.
    ``node`` is the config node holding CONFIG_FILE / WEIGHTS / ALLOW_RANDOM_INIT (``key`` is its
    name in error messages); FGFI's by default, the blur distillation's conventional teacher too.
    Every teacher tensor whose name starts with ``required_prefix`` (FGFI reads the backbone only;
    "" = all) must be in the weights file with its shape, or the error names those that are not."""
    from ..config import check_native_ops_for, get_distill_cfg

    t = cfg.MODEL.FGFI.TEACHER if node is None else node
    config_file = resolve_path(t.CONFIG_FILE)
    if not config_file or not os.path.isfile(config_file):
        raise TeacherLoadError(f"{key}.CONFIG_FILE = {t.CONFIG_FILE!r} is not a file")
    tcfg = get_distill_cfg()
    tcfg.merge_from_file(config_file)
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.MODEL.WEIGHTS = ""
    tcfg.MODEL.META_ARCHITECTURE = deployed_meta_architecture(tcfg.MODEL.META_ARCHITECTURE)
    check_native_ops_for(tcfg, f"the teacher config {t.CONFIG_FILE} ({key})")
    teacher = build_model(tcfg)
    if not isinstance(teacher, (GeneralizedRCNN, DenseDetector)):
        raise TeacherLoadError(
            f"the teacher config {t.CONFIG_FILE} ({key}) builds {type(teacher).__name__}, "
            "not a detector (GeneralizedRCNN, RetinaNet, FCOS or a subclass)"
        )
    weights_file = resolve_path(t.WEIGHTS)
    if t.WEIGHTS and not t.ALLOW_RANDOM_INIT:
        if not os.path.isfile(weights_file):
            raise TeacherLoadError(
                f"{key}.WEIGHTS = {t.WEIGHTS!r}: no such file (train the teacher "
                f"config {t.CONFIG_FILE} first)"
            )
        weights = read_weights(weights_file)
        own = teacher.state_dict()
        required = [k for k in own if k.startswith(required_prefix)]
        missing = [k for k in required if k not in weights]
        mismatched = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in required
                      if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
        if missing or mismatched:
            what = f"'{required_prefix}*'" if required_prefix else "every"
            raise TeacherLoadError(
                f"the teacher weights {weights_file} ({key}) do not fit the teacher built from "
                f"{t.CONFIG_FILE}: {what} tensor must load with its shape; "
                f"{len(missing)} missing ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}), "
                f"{len(mismatched)} with another shape ({', '.join(mismatched[:5])}"
                f"{', ...' if len(mismatched) > 5 else ''}). Wrong file or wrong config?"
            )
        matched = [k for k in own if k in weights and tuple(weights[k].shape) == tuple(own[k].shape)]
        teacher.load_state_dict({k: torch.as_tensor(weights[k]) for k in matched}, strict=False)
        logger.info(
            "Teacher (%s) loaded from %s: %d/%d tensors (all %d of '%s*')",
            key, weights_file, len(matched), len(own), len(required), required_prefix,
        )
    elif t.ALLOW_RANDOM_INIT:
        logger.warning("Teacher has RANDOM weights (%s.ALLOW_RANDOM_INIT)", key)
    else:
        raise TeacherLoadError(
            f"{key}.WEIGHTS is empty: a trained teacher is needed (train the teacher "
            "config first and pass its model_final.pth)"
        )
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, tcfg


@DISTILLER_REGISTRY.register()
class FGFI(nn.Module):
    replaces_inference = False

    def __init__(self, cfg, *, backbone, num_classes, head_in_features):
        super().__init__()
        c = cfg.MODEL.FGFI
        check_fgfi_has_anchors(cfg)  # before the teacher is built
        teacher, tcfg = build_teacher(cfg)
        object.__setattr__(self, "teacher", teacher)  # hidden: see module docstring
        # the teacher normalises with its own PIXEL_MEAN/STD (preprocess_image); its colour order
        # is made from the student's input here
        self.flip_channels = teacher_sees_flipped_channels(cfg, tcfg, "MODEL.FGFI.TEACHER")
        key, teacher_classes = num_classes_key(tcfg)
        if teacher_classes != num_classes:
            raise TeacherLoadError(
                f"FGFI teacher has {teacher_classes} classes ({key} in {c.TEACHER.CONFIG_FILE}), "
                f"the student {num_classes}"
            )
        self.levels = list(head_in_features)  # the levels the student's head (RPN or RetinaNet) reads
        s_shape, t_shape = backbone.output_shape(), teacher.backbone.output_shape()
        for l in self.levels:
            if l not in t_shape or t_shape[l].stride != s_shape[l].stride:
                raise TeacherLoadError(
                    f"FGFI teacher feature '{l}' (stride {getattr(t_shape.get(l), 'stride', None)}) "
                    f"does not match the student's (stride {s_shape[l].stride})"
                )
        self.adapters = nn.ModuleDict(
            {l: nn.Conv2d(s_shape[l].channels, t_shape[l].channels, 3, padding=1) for l in self.levels}
        )
        for conv in self.adapters.values():  # N(0, 1e-4) truncated at 2 sigma, zero bias
            nn.init.trunc_normal_(conv.weight, std=1e-4, a=-2e-4, b=2e-4)
            nn.init.zeros_(conv.bias)
        self.psi = c.PSI
        self.level_assignment = c.LEVEL_ASSIGNMENT
        self.loss_weight = c.LOSS_WEIGHT
        self.schedule = DistillSchedule(max_iter=cfg.SOLVER.MAX_ITER, warmup=c.WARMUP_ITERS)

    def forward(self, detector, images, features, gt_instances, batched_inputs, iteration):
        teacher = self.teacher
        device = features[self.levels[0]].device
        if teacher.device != device:
            teacher.to(device)
        with torch.no_grad():
            if self.flip_channels:
                batched_inputs = [{**x, "image": x["image"].flip(0)} for x in batched_inputs]
            t_images = teacher.preprocess_image(batched_inputs)
            t_features = teacher.backbone(t_images.tensor)
        student = [features[l] for l in self.levels]
        for l, s in zip(self.levels, student):
            if s.shape[-2:] != t_features[l].shape[-2:]:
                raise RuntimeError(
                    f"FGFI: teacher feature '{l}' is {tuple(t_features[l].shape[-2:])} but the "
                    f"student's is {tuple(s.shape[-2:])}; use the same INPUT sizes and "
                    "SIZE_DIVISIBILITY for both"
                )
        anchors = detector.imitation_anchor_generator(student)
        with torch.no_grad():
            masks = imitation_masks(anchors, [s.shape[-2:] for s in student], gt_instances,
                                    self.psi, self.level_assignment)
        adapted = [self.adapters[l](s) for l, s in zip(self.levels, student)]
        loss, _ = masked_imitation_loss(adapted, [t_features[l] for l in self.levels], masks)
        # Zero weight (not skipped) during warm-up, so the adapters stay in the graph (DDP).
        weight = self.loss_weight if self.schedule.warmed_up(iteration) else 0.0
        return {"loss_fgfi_imitation": weight * loss}

    def parameters_without_update(self, detector, iteration):
        return []
