"""MODEL.FGFI: the keys of fine-grained feature imitation (Wang et al., CVPR 2019), their defaults
and their validation."""
from detectron2.config import CfgNode as CN


def add_fgfi_config(cfg):
    _C = cfg
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


def validate_fgfi_config(cfg):
    f = cfg.MODEL.FGFI
    if f.WARMUP_ITERS < 0:
        raise ValueError(f"MODEL.FGFI.WARMUP_ITERS = {f.WARMUP_ITERS} must be >= 0")
    if not 0 < f.PSI <= 1:
        raise ValueError(f"MODEL.FGFI.PSI = {f.PSI} must be in (0, 1]")
    if f.LOSS_WEIGHT < 0:
        raise ValueError(f"MODEL.FGFI.LOSS_WEIGHT = {f.LOSS_WEIGHT} must be >= 0")
    if f.LEVEL_ASSIGNMENT not in ("all", "per_level"):
        raise ValueError(f"MODEL.FGFI.LEVEL_ASSIGNMENT = {f.LEVEL_ASSIGNMENT!r}; use 'all' or 'per_level'")
    if cfg.MODEL.META_ARCHITECTURE.startswith("Distill") and cfg.MODEL.DISTILL.METHOD == "FGFI":
        check_fgfi_has_anchors(cfg)


def check_fgfi_has_anchors(cfg):
    """FGFI's imitation mask needs the student's anchors; stop for anchor-free students."""
    if "FCOS" in cfg.MODEL.META_ARCHITECTURE:
        raise ValueError(
            "FGFI's imitation mask is built from anchors and FCOS is anchor-free; use LGD, or "
            "FGFI with DistillGeneralizedRCNN or DistillRetinaNet"
        )
