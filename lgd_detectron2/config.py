"""Config keys of lgd-detectron2: ``add_distill_config(cfg)`` must run before ``merge_from_file``."""
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .fcos import add_fcos_config
from .lgd.config import add_lgd_config, validate_lgd_config
from .udfa.config import add_udfa_config, validate_udfa_config
from .wsod.config import add_wsod_config, validate_wsod_config


def add_distill_config(cfg):
    """Add MODEL.DISTILL (shared), MODEL.LGD, MODEL.FGFI, MODEL.FCOS, the blur keys
    (``add_blur_config``), MODEL.UDFA (``udfa.config``) and MODEL.WSOD / TEST.WSOD
    (``wsod.config``) with their defaults, in place."""
    _C = cfg
    add_fcos_config(_C)

    # ---------------- shared distillation mechanism ----------------
    _C.MODEL.DISTILL = CN()
    # Which distiller the "Distill*" meta-architectures attach: "LGD", "FGFI" or "UDFA".
    _C.MODEL.DISTILL.METHOD = "LGD"
    # Pass find_unused_parameters=True to DistributedDataParallel (not needed by LGD/FGFI:
    # every training-only parameter receives a gradient in every schedule phase).
    _C.MODEL.DISTILL.FIND_UNUSED_PARAMETERS = False

    add_lgd_config(_C)

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

    # ---------------- training loop ----------------
    # Autocast dtype when SOLVER.AMP.ENABLED: "float16" (with a gradient scaler) or "bfloat16"
    # (fp32's exponent range: no scaler, and a randomly initialised detector does not overflow).
    _C.SOLVER.AMP.DTYPE = "float16"

    add_blur_config(_C)
    add_udfa_config(_C)
    add_wsod_config(_C)
    return cfg


def add_blur_config(cfg):
    """INPUT.BLUR (training-time motion blur), MODEL.DEBLUR (the per-level feature-deblurring
    module of ``build_resnet_fpn_deblur_backbone``) and MODEL.BLUR_SKD (``SelfGuidedBlurRCNN``:
    the sharp view teaches the blurred view; spec: shared/specs/other-skd.md section 1)."""
    _C = cfg
    _C.INPUT.BLUR = CN()
    # "off"; "augment": each training image is replaced by a blurred copy with probability PROB;
    # "paired": every training input carries "image" (sharp) and "image_blurred" (its blurred
    # copy, same augmentation, same boxes) for SelfGuidedBlurRCNN.
    _C.INPUT.BLUR.MODE = "off"
    _C.INPUT.BLUR.PROB = 0.5
    # Severities (1-5: kernel extents 7, 13, 19, 25, 31 px on the original image) sampled
    # uniformly per training image; the kernel is drawn on the fly from a bank seeded with
    # KERNEL_SEED (evaluation copies "<dataset>_blur<N>" use their own fixed seed, 2022, so
    # training and test kernels are different draws of the same distribution).
    _C.INPUT.BLUR.SEVERITIES = [1, 2, 3, 4, 5]
    _C.INPUT.BLUR.KERNEL_SEED = 0

    _C.MODEL.DEBLUR = CN()
    # FPN levels that get a deblurring block (empty = all of them).
    _C.MODEL.DEBLUR.IN_FEATURES = []
    _C.MODEL.DEBLUR.BOTTLENECK_CHANNELS = 64
    _C.MODEL.DEBLUR.NORM = "BN"
    # Deformable 3x3 (torchvision's deform_conv2d, offsets predicted from the block's input).
    _C.MODEL.DEBLUR.DEFORMABLE = True

    _C.MODEL.BLUR_SKD = CN()
    # "self": the sharp view of the same network is the teacher (self-guided distillation);
    # "frozen": a separately trained detector (FROZEN_TEACHER) sees the sharp view
    # (conventional distillation with the same losses).
    _C.MODEL.BLUR_SKD.TEACHER = "self"
    _C.MODEL.BLUR_SKD.FROZEN_TEACHER = CN()
    _C.MODEL.BLUR_SKD.FROZEN_TEACHER.CONFIG_FILE = ""
    _C.MODEL.BLUR_SKD.FROZEN_TEACHER.WEIGHTS = ""
    _C.MODEL.BLUR_SKD.FROZEN_TEACHER.ALLOW_RANDOM_INIT = False
    # The detection loss on the sharp view too (the network learns from both views).
    _C.MODEL.BLUR_SKD.SHARP_DETECTION_LOSS = True
    # Weight of each view's detection loss. 0.5: the mean over the 2N images of a paired batch of
    # N images, as Detectron2 averages a batch's losses over its images, so the shared network's
    # gradient has the scale the baseline recipe's LR was set for (a plain sum doubles it, like a
    # doubled LR). Only the blurred view's loss (no sharp loss): use 1.0.
    _C.MODEL.BLUR_SKD.DETECTION_LOSS_WEIGHT = 0.5
    # lambda_2: l1 distance of l1-normalised maps, deblurred blurred view -> detached sharp view.
    _C.MODEL.BLUR_SKD.FEATURE_LOSS_WEIGHT = 0.5
    # lambda_1: soft-label loss on the box head (KL to the teacher's class distribution on all
    # sampled RoIs, fg and bg halves balanced, + ALPHA * L1 on the GT-class box deltas of fg RoIs).
    _C.MODEL.BLUR_SKD.SOFT_LABEL_WEIGHT = 0.3
    _C.MODEL.BLUR_SKD.SOFT_LABEL_REG_WEIGHT = 0.5
    _C.MODEL.BLUR_SKD.TEMPERATURE = 1.0
    # The sharp pass that teaches when TEACHER is "self":
    #   "shared": the network itself (stop-gradient at its outputs: the target moves with every
    #             update of the network it is compared with);
    #   "ema": an exponential moving average of the network (teacher <- m * teacher + (1 - m) *
    #          network every iteration, m = TEACHER_MOMENTUM);
    #   "snapshot": a copy of the network, refreshed every SNAPSHOT_PERIOD iterations.
    # The copies start as the network at the first training iteration and are saved in checkpoints
    # (``self_teacher.*``, dropped on export).
    _C.MODEL.BLUR_SKD.SELF_TEACHER = "shared"
    _C.MODEL.BLUR_SKD.TEACHER_MOMENTUM = 0.99
    _C.MODEL.BLUR_SKD.SNAPSHOT_PERIOD = 50
    # What the two distillation losses train: "all" (the blurred path: bottom-up, FPN, deblurring
    # blocks, and the box head unless the shared self-teacher is that head) or "deblur" (the
    # deblurring blocks only; everything else learns from the detection losses).
    _C.MODEL.BLUR_SKD.DISTILL_INTO = "all"
    # The distillation losses have weight 0 for the first N iterations (kept in the graph).
    _C.MODEL.BLUR_SKD.WARMUP_ITERS = 0
    # BatchNorm over a paired batch: "joint" (one backbone pass over sharp + blurred images: one
    # set of batch statistics, through which the blurred view's losses also reach the sharp
    # activations) or "per_view" (one pass per view, each with its own batch statistics). BatchNorm
    # frozen at the starting checkpoint's statistics (fine-tuning): MODEL.RESNETS.NORM "FrozenBN".
    _C.MODEL.BLUR_SKD.PAIRED_BN = "joint"
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
    validate_lgd_config(cfg)
    check_native_ops_for(cfg, "the config")
    if cfg.MODEL.FGFI.WARMUP_ITERS < 0:
        raise ValueError(f"MODEL.FGFI.WARMUP_ITERS = {cfg.MODEL.FGFI.WARMUP_ITERS} must be >= 0")
    if not 0 < cfg.MODEL.FGFI.PSI <= 1:
        raise ValueError(f"MODEL.FGFI.PSI = {cfg.MODEL.FGFI.PSI} must be in (0, 1]")
    if cfg.SOLVER.AMP.DTYPE not in ("float16", "bfloat16"):
        raise ValueError(f"SOLVER.AMP.DTYPE = {cfg.SOLVER.AMP.DTYPE!r}; use 'float16' or 'bfloat16'")
    if cfg.SOLVER.MAX_ITER <= 0:
        raise ValueError(f"SOLVER.MAX_ITER = {cfg.SOLVER.MAX_ITER} must be > 0")
    if cfg.MODEL.FGFI.LOSS_WEIGHT < 0:
        raise ValueError(f"MODEL.FGFI.LOSS_WEIGHT = {cfg.MODEL.FGFI.LOSS_WEIGHT} must be >= 0")
    distilled = cfg.MODEL.META_ARCHITECTURE.startswith("Distill")
    if distilled and cfg.MODEL.DISTILL.METHOD == "FGFI":
        check_fgfi_has_anchors(cfg)
    validate_blur_config(cfg)
    validate_udfa_config(cfg)
    validate_wsod_config(cfg)
    return cfg


def validate_blur_config(cfg):
    blur, skd = cfg.INPUT.BLUR, cfg.MODEL.BLUR_SKD
    if blur.MODE not in ("off", "augment", "paired"):
        raise ValueError(f"INPUT.BLUR.MODE = {blur.MODE!r}; use 'off', 'augment' or 'paired'")
    if not 0 <= blur.PROB <= 1:
        raise ValueError(f"INPUT.BLUR.PROB = {blur.PROB} must be in [0, 1]")
    if not blur.SEVERITIES or any(s not in range(1, 6) for s in blur.SEVERITIES):
        raise ValueError(f"INPUT.BLUR.SEVERITIES = {list(blur.SEVERITIES)} must be values in 1..5")
    self_guided = cfg.MODEL.META_ARCHITECTURE == "SelfGuidedBlurRCNN"
    if self_guided != (blur.MODE == "paired"):
        raise ValueError(
            f"INPUT.BLUR.MODE = {blur.MODE!r} with MODEL.META_ARCHITECTURE = "
            f"{cfg.MODEL.META_ARCHITECTURE!r}: SelfGuidedBlurRCNN trains on paired views and "
            "needs INPUT.BLUR.MODE 'paired'; other detectors take 'off' or 'augment'"
        )
    if skd.TEACHER not in ("self", "frozen"):
        raise ValueError(f"MODEL.BLUR_SKD.TEACHER = {skd.TEACHER!r}; use 'self' or 'frozen'")
    for key in ("DETECTION_LOSS_WEIGHT", "FEATURE_LOSS_WEIGHT", "SOFT_LABEL_WEIGHT", "SOFT_LABEL_REG_WEIGHT"):
        if skd[key] < 0:
            raise ValueError(f"MODEL.BLUR_SKD.{key} = {skd[key]} must be >= 0")
    choices = {"SELF_TEACHER": ("shared", "ema", "snapshot"), "DISTILL_INTO": ("all", "deblur"),
               "PAIRED_BN": ("joint", "per_view")}
    for key, allowed in choices.items():
        if skd[key] not in allowed:
            raise ValueError(f"MODEL.BLUR_SKD.{key} = {skd[key]!r}; use one of {list(allowed)}")
    if not 0 <= skd.TEACHER_MOMENTUM < 1:
        raise ValueError(f"MODEL.BLUR_SKD.TEACHER_MOMENTUM = {skd.TEACHER_MOMENTUM} must be in [0, 1)")
    if skd.SNAPSHOT_PERIOD < 1 or skd.WARMUP_ITERS < 0:
        raise ValueError(f"MODEL.BLUR_SKD.SNAPSHOT_PERIOD = {skd.SNAPSHOT_PERIOD} must be >= 1 and "
                         f"MODEL.BLUR_SKD.WARMUP_ITERS = {skd.WARMUP_ITERS} >= 0")
    if skd.TEMPERATURE <= 0:
        raise ValueError(f"MODEL.BLUR_SKD.TEMPERATURE = {skd.TEMPERATURE} must be > 0")
    if cfg.MODEL.DEBLUR.BOTTLENECK_CHANNELS <= 0:
        raise ValueError(f"MODEL.DEBLUR.BOTTLENECK_CHANNELS = {cfg.MODEL.DEBLUR.BOTTLENECK_CHANNELS} must be > 0")


def check_fgfi_has_anchors(cfg):
    """FGFI's imitation mask needs the student's anchors; stop for anchor-free students."""
    if "FCOS" in cfg.MODEL.META_ARCHITECTURE:
        raise ValueError(
            "FGFI's imitation mask is built from anchors and FCOS is anchor-free; use LGD, or "
            "FGFI with DistillGeneralizedRCNN or DistillRetinaNet"
        )


def check_native_ops_for(cfg, what):
    """Deformable convolution needs Detectron2's compiled ops: refuse such a config before anything
    is built when this Detectron2 has none (the PyPI route), naming the key."""
    from .compat import has_native_ops

    stages = list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE)
    if any(stages) and not has_native_ops():
        raise ValueError(
            f"{what} sets MODEL.RESNETS.DEFORM_ON_PER_STAGE = {stages}: deformable convolution "
            "needs Detectron2 built with its C++ ops (detectron2._C), which this installation "
            "lacks; see 'Installing on a GPU machine' in README.md"
        )
