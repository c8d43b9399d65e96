"""MODEL.LGD: the keys of label-guided self-distillation (Zhang et al., AAAI 2022), their defaults
(the released configs' values where the original has the key) and their validation."""
import logging

from detectron2.config import CfgNode as CN

from .self_teacher import CLASS_IDENTITIES, INTERACT_PATTERNS, REGION_MASKS

logger = logging.getLogger(__name__)

SCHEDULE_KEYS = ("PRE_NONDISTILL_ITERS", "POST_NONDISTILL_ITERS", "PRE_FREEZE_STUDENT_BACKBONE_ITERS")


def add_lgd_config(cfg):
    _C = cfg
    _C.MODEL.LGD = CN()
    # FPN levels the self-teacher builds maps for (its detection loss reads them through the
    # student's head; the head's other levels keep the student's own, detached features).
    # Empty = all levels of the backbone (the paper: p2-p6 for R-CNN, p3-p7 for one-stage).
    _C.MODEL.LGD.IN_FEATURES = []
    # Levels the distillation loss uses, a subset of the teacher's levels; empty = the same
    # levels as IN_FEATURES (the original has one list for both).
    _C.MODEL.LGD.DISTILL_FEATURES = []
    # Distillation loss weight (lambda). The teacher detection losses have weight 1.
    _C.MODEL.LGD.LAMBDA = 1.0
    # How L_distill weighs the levels: "elements" (the original: one mean over all levels'
    # elements, each level weighs by its cell count) or "levels" (each level's mean, averaged).
    _C.MODEL.LGD.LEVEL_WEIGHTING = "elements"
    # Before this iteration the distillation loss trains only the adapter (student detached).
    _C.MODEL.LGD.PRE_NONDISTILL_ITERS = 30000
    # Distillation off again (adapter only) for the last N iterations.
    _C.MODEL.LGD.POST_NONDISTILL_ITERS = 0
    # The bottom-up backbone gets no update at all before this iteration (requires_grad off:
    # its backward is skipped, not computed and thrown away).
    _C.MODEL.LGD.PRE_FREEZE_STUDENT_BACKBONE_ITERS = 20000
    # Whether the teacher's detection losses L_det^I train the shared head (the original: yes).
    # False (ours): the head is read-only in the teacher's pass; L_det^I trains the self-teacher
    # only and the head learns from the student's losses alone (docs/LGD.md).
    _C.MODEL.LGD.TEACHER_LOSS_TRAINS_HEAD = True
    # Detach student FPN features before the appearance encoder (teacher loss cannot reach them).
    _C.MODEL.LGD.DETACH_APPEARANCE_EMBED = True
    # Add one whole-image "context" object per image.
    _C.MODEL.LGD.ADD_CONTEXT_BOX = False
    # Heads of the inter-object relation attention.
    _C.MODEL.LGD.NUM_HEADS = 8
    # How labels and appearance interact (the original's INTERACT_PATTERN): "stuGuided"
    # (query = appearance, key = value = labels), "labelGuided" (query = labels, key = value =
    # appearance), "teacher_fill" (label embeddings only), "student_fill" (appearance only).
    _C.MODEL.LGD.INTERACT_PATTERN = "stuGuided"
    # How each object's own class reaches its painted cells (ours; lgd/self_teacher.py):
    # "attention" (the original: only through the relation attention), "residual" (its own label
    # embedding added to the attention output), "class_channels" (LabelEnc's way: one painted
    # channel per class, each box in its class's channel).
    _C.MODEL.LGD.CLASS_IDENTITY = "attention"
    # Which cells an object is painted into and pooled from (ours; lgd/self_teacher.py):
    # "cell_centres" (the original: binary, a cell whose centre is in the box) or "coverage"
    # (each cell weighted by the fraction of its area in the box: edges kept to sub-cell precision).
    _C.MODEL.LGD.REGION_MASK = "cell_centres"
    # Activation checkpointing: the self-teacher's refinement convs and the adapter recompute
    # their activations in backward instead of keeping them (less memory, slower step).
    _C.MODEL.LGD.RECOMPUTE_IN_BACKWARD = False
    # Evaluate the self-teacher as an oracle (needs ground truth at test time) instead of the
    # student. Off by default: inference is the student alone.
    _C.MODEL.LGD.EVAL_TEACHER = False
    # At every evaluation of a training run (TEST.EVAL_PERIOD), also evaluate the self-teacher
    # oracle and report it beside the student as "teacher_bbox/..." (AP, AP50, class-agnostic AP).
    _C.MODEL.LGD.REPORT_TEACHER = True
    # The teacher guard: every PERIOD iterations (0: TEST.EVAL_PERIOD, or
    # SOLVER.CHECKPOINT_PERIOD when evaluation is off) the mean detection loss of the self-teacher
    # over the period is compared with the student's; when it is not below, a warning says so.
    # With SWITCH_OFF_DISTILL the distillation loss then reaches only the adapter during the next
    # period (decided again at the end of each period; saved in checkpoints). Off by default: on
    # docs/LGD.md's pretrained protocol switching off made the student worse.
    _C.MODEL.LGD.TEACHER_GUARD = CN()
    _C.MODEL.LGD.TEACHER_GUARD.PERIOD = 0
    _C.MODEL.LGD.TEACHER_GUARD.SWITCH_OFF_DISTILL = False
    return cfg


def is_lgd_config(cfg):
    """A ``Distill*`` meta-architecture with MODEL.DISTILL.METHOD "LGD"."""
    return cfg.MODEL.META_ARCHITECTURE.startswith("Distill") and cfg.MODEL.DISTILL.METHOD == "LGD"


def validate_lgd_config(cfg):
    c = cfg.MODEL.LGD
    for key in SCHEDULE_KEYS:
        if c[key] < 0:
            raise ValueError(f"MODEL.LGD.{key} = {c[key]} must be >= 0")
    if c.LEVEL_WEIGHTING not in ("elements", "levels"):
        raise ValueError(f"MODEL.LGD.LEVEL_WEIGHTING = {c.LEVEL_WEIGHTING!r}; use 'elements' or 'levels'")
    if c.LAMBDA < 0:
        raise ValueError(f"MODEL.LGD.LAMBDA = {c.LAMBDA} must be >= 0")
    if c.NUM_HEADS <= 0 or cfg.MODEL.FPN.OUT_CHANNELS % c.NUM_HEADS:
        raise ValueError(
            f"MODEL.LGD.NUM_HEADS = {c.NUM_HEADS} must divide MODEL.FPN.OUT_CHANNELS = "
            f"{cfg.MODEL.FPN.OUT_CHANNELS}"
        )
    if c.INTERACT_PATTERN not in INTERACT_PATTERNS:
        raise ValueError(f"MODEL.LGD.INTERACT_PATTERN = {c.INTERACT_PATTERN!r}; use one of {list(INTERACT_PATTERNS)}")
    if c.CLASS_IDENTITY not in CLASS_IDENTITIES:
        raise ValueError(f"MODEL.LGD.CLASS_IDENTITY = {c.CLASS_IDENTITY!r}; use one of {list(CLASS_IDENTITIES)}")
    if c.REGION_MASK not in REGION_MASKS:
        raise ValueError(f"MODEL.LGD.REGION_MASK = {c.REGION_MASK!r}; use one of {list(REGION_MASKS)}")
    if c.CLASS_IDENTITY == "residual" and c.INTERACT_PATTERN == "teacher_fill":
        raise ValueError("MODEL.LGD.CLASS_IDENTITY 'residual' adds the label embedding that "
                         "MODEL.LGD.INTERACT_PATTERN 'teacher_fill' already paints (2 E')")
    if c.CLASS_IDENTITY == "residual" and c.INTERACT_PATTERN == "student_fill":
        raise ValueError("MODEL.LGD.CLASS_IDENTITY 'residual' adds label embeddings, which "
                         "MODEL.LGD.INTERACT_PATTERN 'student_fill' does not compute; use "
                         "'class_channels' or another pattern")
    if c.IN_FEATURES and c.DISTILL_FEATURES:
        missing = [l for l in c.DISTILL_FEATURES if l not in c.IN_FEATURES]
        if missing:
            raise ValueError(
                f"MODEL.LGD.DISTILL_FEATURES has {missing}, for which the self-teacher builds no "
                f"map (MODEL.LGD.IN_FEATURES = {list(c.IN_FEATURES)})"
            )
    if c.TEACHER_GUARD.PERIOD < 0:
        raise ValueError(f"MODEL.LGD.TEACHER_GUARD.PERIOD = {c.TEACHER_GUARD.PERIOD} must be >= 0")
    if is_lgd_config(cfg) and "fpn" not in cfg.MODEL.BACKBONE.NAME.lower():
        raise ValueError(
            f"LGD needs an FPN backbone; MODEL.BACKBONE.NAME = {cfg.MODEL.BACKBONE.NAME!r} "
            "(use build_resnet_fpn_backbone or build_retinanet_resnet_fpn_backbone)"
        )
    if is_lgd_config(cfg) and not cfg.MODEL.WEIGHTS:
        # measured (docs/LGD.md, Protocols): not an error, LGD runs, but a user should know
        logger.warning(
            "LGD on a randomly initialised backbone (MODEL.WEIGHTS is empty). Measured with Faster "
            "R-CNN on the built-in data against a baseline trained the same way: from scratch, 8.3 AP "
            "below it after 800 iterations (3 seed pairs, 95% CI -11.4 to -5.2) and +3.7 after 400 "
            "(3 pairs, not resolved); "
            "from a classification-pretrained body (two pretrainings, 5 pairs each) +1.2 (not resolved) "
            "and +1.7 (95% CI +0.9 to +2.5) after 400 iterations, +0.2 and +0.9 (neither resolved) "
            "after 800. The released "
            "recipes start from ImageNet weights. "
            "Compare with a baseline trained the same way (docs/LGD.md, Protocols)")


def guard_period(cfg):
    """Iterations between two teacher-guard decisions."""
    return cfg.MODEL.LGD.TEACHER_GUARD.PERIOD or cfg.TEST.EVAL_PERIOD or cfg.SOLVER.CHECKPOINT_PERIOD
