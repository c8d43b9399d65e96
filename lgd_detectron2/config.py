"""Config keys of lgd-detectron2: ``add_distill_config(cfg)`` must run before ``merge_from_file``."""
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .fcos import add_fcos_config


def add_distill_config(cfg):
    """Add MODEL.DISTILL (shared), MODEL.LGD, MODEL.FGFI and MODEL.FCOS with their defaults, in
    place."""
    _C = cfg
    add_fcos_config(_C)

    # ---------------- shared distillation mechanism ----------------
    _C.MODEL.DISTILL = CN()
    # Which distiller the "Distill*" meta-architectures attach: "LGD" or "FGFI".
    _C.MODEL.DISTILL.METHOD = "LGD"
    # Pass find_unused_parameters=True to DistributedDataParallel (not needed by LGD/FGFI:
    # every training-only parameter receives a gradient in every schedule phase).
    _C.MODEL.DISTILL.FIND_UNUSED_PARAMETERS = False

    # ---------------- LGD: label-guided self-distillation (Zhang et al., AAAI 2022) ----------
    _C.MODEL.LGD = CN()
    # FPN levels the self-teacher builds and the distillation loss uses; empty = all levels of
    # the backbone (the paper: p2-p6 for R-CNN, p3-p7 for one-stage detectors).
    _C.MODEL.LGD.IN_FEATURES = []
    # Distillation loss weight (lambda). The teacher detection losses have weight 1.
    _C.MODEL.LGD.LAMBDA = 1.0
    # Before this iteration the distillation loss trains only the adapter (student detached).
    _C.MODEL.LGD.PRE_NONDISTILL_ITERS = 30000
    # Distillation off again (adapter only) for the last N iterations.
    _C.MODEL.LGD.POST_NONDISTILL_ITERS = 0
    # The bottom-up backbone gets no update at all (grads dropped) before this iteration.
    _C.MODEL.LGD.PRE_FREEZE_STUDENT_BACKBONE_ITERS = 20000
    # Detach student FPN features before the appearance encoder (teacher loss cannot reach them).
    _C.MODEL.LGD.DETACH_APPEARANCE_EMBED = True
    # Add one whole-image "context" object per image.
    _C.MODEL.LGD.ADD_CONTEXT_BOX = False
    # Heads of the inter-object relation attention.
    _C.MODEL.LGD.NUM_HEADS = 8
    # Evaluate the self-teacher as an oracle (needs ground truth at test time) instead of the
    # student. Off by default: inference is the student alone.
    _C.MODEL.LGD.EVAL_TEACHER = False

    # ---------------- FGFI: fine-grained feature imitation (Wang et al., CVPR 2019) -----------
    _C.MODEL.FGFI = CN()
    _C.MODEL.FGFI.TEACHER = CN()
    # YAML of the teacher detector (built with a fresh config) and its trained weights.
    _C.MODEL.FGFI.TEACHER.CONFIG_FILE = ""
    _C.MODEL.FGFI.TEACHER.WEIGHTS = ""
    # Build the teacher with random weights and ignore TEACHER.WEIGHTS (tests, cost benchmarks).
    _C.MODEL.FGFI.TEACHER.ALLOW_RANDOM_INIT = False
    # A location imitates if one of its anchors has IoU > PSI * (that box's best anchor IoU).
    _C.MODEL.FGFI.PSI = 0.5
    # How GT boxes reach pyramid levels: "all" (best IoU over all levels, Eq. of the paper
    # applied to the union of anchors) or "per_level" (each level's own best IoU).
    _C.MODEL.FGFI.LEVEL_ASSIGNMENT = "all"
    _C.MODEL.FGFI.LOSS_WEIGHT = 0.01
    # Imitation loss off (zero weight) for the first N iterations.
    _C.MODEL.FGFI.WARMUP_ITERS = 0
    return cfg


def get_distill_cfg():
    """A fresh Detectron2 config with this project's keys added."""
    cfg = get_cfg()
    add_distill_config(cfg)
    return cfg


def num_classes_key(cfg):
    """(config key, value) of the detector's class count, by meta-architecture family."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if "RetinaNet" in arch:
        return "MODEL.RETINANET.NUM_CLASSES", cfg.MODEL.RETINANET.NUM_CLASSES
    if "FCOS" in arch:
        return "MODEL.FCOS.NUM_CLASSES", cfg.MODEL.FCOS.NUM_CLASSES
    return "MODEL.ROI_HEADS.NUM_CLASSES", cfg.MODEL.ROI_HEADS.NUM_CLASSES


def validate_config(cfg):
    """Reject impossible values before anything is built (unknown keys are already rejected by
    ``merge_from_file``/``merge_from_list`` with the key named)."""
    for key in ("PRE_NONDISTILL_ITERS", "POST_NONDISTILL_ITERS", "PRE_FREEZE_STUDENT_BACKBONE_ITERS"):
        if cfg.MODEL.LGD[key] < 0:
            raise ValueError(f"MODEL.LGD.{key} = {cfg.MODEL.LGD[key]} must be >= 0")
    if cfg.MODEL.FGFI.WARMUP_ITERS < 0:
        raise ValueError(f"MODEL.FGFI.WARMUP_ITERS = {cfg.MODEL.FGFI.WARMUP_ITERS} must be >= 0")
    if not 0 < cfg.MODEL.FGFI.PSI <= 1:
        raise ValueError(f"MODEL.FGFI.PSI = {cfg.MODEL.FGFI.PSI} must be in (0, 1]")
    if cfg.SOLVER.MAX_ITER <= 0:
        raise ValueError(f"SOLVER.MAX_ITER = {cfg.SOLVER.MAX_ITER} must be > 0")
    if cfg.MODEL.LGD.LAMBDA < 0 or cfg.MODEL.FGFI.LOSS_WEIGHT < 0:
        raise ValueError("MODEL.LGD.LAMBDA and MODEL.FGFI.LOSS_WEIGHT must be >= 0")
    if cfg.MODEL.LGD.NUM_HEADS <= 0 or cfg.MODEL.FPN.OUT_CHANNELS % cfg.MODEL.LGD.NUM_HEADS:
        raise ValueError(
            f"MODEL.LGD.NUM_HEADS = {cfg.MODEL.LGD.NUM_HEADS} must divide "
            f"MODEL.FPN.OUT_CHANNELS = {cfg.MODEL.FPN.OUT_CHANNELS}"
        )
    distilled = cfg.MODEL.META_ARCHITECTURE.startswith("Distill")
    if distilled and cfg.MODEL.DISTILL.METHOD == "LGD" and "fpn" not in cfg.MODEL.BACKBONE.NAME.lower():
        raise ValueError(
            f"LGD needs an FPN backbone; MODEL.BACKBONE.NAME = {cfg.MODEL.BACKBONE.NAME!r} "
            "(use build_resnet_fpn_backbone or build_retinanet_resnet_fpn_backbone)"
        )
    if distilled and cfg.MODEL.DISTILL.METHOD == "FGFI":
        check_fgfi_has_anchors(cfg)
    return cfg


def check_fgfi_has_anchors(cfg):
    """FGFI's imitation mask needs the student's anchors; stop for anchor-free students."""
    if "FCOS" in cfg.MODEL.META_ARCHITECTURE:
        raise ValueError(
            "FGFI's imitation mask is built from anchors and FCOS is anchor-free; use LGD, or "
            "FGFI with DistillGeneralizedRCNN or DistillRetinaNet"
        )
