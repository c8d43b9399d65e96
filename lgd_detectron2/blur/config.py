"""The blur keys: INPUT.BLUR (training-time motion blur), MODEL.DEBLUR (the feature-deblurring
blocks) and MODEL.BLUR_SKD (self-guided blur distillation), their defaults and their validation."""
import logging

from detectron2.config import CfgNode as CN

logger = logging.getLogger(__name__)


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
    # Severities (1-5: kernel extents EXTENTS) sampled uniformly per training image; the kernel is
    # drawn on the fly from a bank seeded with KERNEL_SEED (evaluation copies "<dataset>_blur<N>"
    # use their own fixed seed, 2022, so training and test kernels are different draws of the same
    # distribution).
    _C.INPUT.BLUR.SEVERITIES = [1, 2, 3, 4, 5]
    _C.INPUT.BLUR.KERNEL_SEED = 0
    # Kernel extent (side, px; even values are made odd) of severities 1..5: the spec's 7-31 px at
    # COCO scale. Blur is applied to the image as stored, before any resize, so with
    # REFERENCE_SIZE 0 an extent is in pixels of the stored image whatever its size (31 px is ~4%
    # of an 800-px side but 16% of the 192-px demo images). REFERENCE_SIZE > 0: the extents are
    # for an image whose shorter side is REFERENCE_SIZE px, and an image of shorter side s gets
    # extent * s / REFERENCE_SIZE rounded to the nearest odd size (at least 3), so severity is a
    # fraction of the image side (COCO-relative: 800). Training blur and the evaluation copies
    # (registered with the config's values) use the same rule.
    _C.INPUT.BLUR.EXTENTS = [7, 13, 19, 25, 31]
    _C.INPUT.BLUR.REFERENCE_SIZE = 0

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


def validate_blur_config(cfg):
    blur, skd = cfg.INPUT.BLUR, cfg.MODEL.BLUR_SKD
    if blur.MODE not in ("off", "augment", "paired"):
        raise ValueError(f"INPUT.BLUR.MODE = {blur.MODE!r}; use 'off', 'augment' or 'paired'")
    if not 0 <= blur.PROB <= 1:
        raise ValueError(f"INPUT.BLUR.PROB = {blur.PROB} must be in [0, 1]")
    if not blur.SEVERITIES or any(s not in range(1, 6) for s in blur.SEVERITIES):
        raise ValueError(f"INPUT.BLUR.SEVERITIES = {list(blur.SEVERITIES)} must be values in 1..5")
    extents = list(blur.EXTENTS)
    if (len(extents) != 5 or not all(_is_int(e) and e > 0 for e in extents)
            or any((b | 1) <= (a | 1) for a, b in zip(extents, extents[1:]))):
        raise ValueError(f"INPUT.BLUR.EXTENTS = {extents} must be 5 positive integers, increasing once "
                         "even values are made odd (kernel extents in px for severities 1..5)")
    if not _is_int(blur.REFERENCE_SIZE) or blur.REFERENCE_SIZE < 0:
        raise ValueError(f"INPUT.BLUR.REFERENCE_SIZE = {blur.REFERENCE_SIZE!r} must be an integer >= 0 "
                         "(0: EXTENTS in pixels of the stored image; > 0: the shorter side they are for)")
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
    distills = skd.FEATURE_LOSS_WEIGHT > 0 or skd.SOFT_LABEL_WEIGHT > 0 or skd.SOFT_LABEL_REG_WEIGHT > 0
    if (self_guided and skd.TEACHER == "self" and skd.SELF_TEACHER == "shared" and skd.DISTILL_INTO == "all"
            and cfg.MODEL.RESNETS.NORM == "FrozenBN" and distills):
        logger.warning(
            "MODEL.BLUR_SKD: the shared self-teacher distilling into the whole blurred path over a "
            "FrozenBN trunk (MODEL.RESNETS.NORM 'FrozenBN') collapsed in training on the built-in data "
            "(box AP 33.9 -> 2.7 in 120 fine-tuning iterations; with DISTILL_INTO 'deblur' 39.5; "
            "docs/PROTOCOLS.md, blur robustness)")
    if not 0 <= skd.TEACHER_MOMENTUM < 1:
        raise ValueError(f"MODEL.BLUR_SKD.TEACHER_MOMENTUM = {skd.TEACHER_MOMENTUM} must be in [0, 1)")
    if skd.SNAPSHOT_PERIOD < 1 or skd.WARMUP_ITERS < 0:
        raise ValueError(f"MODEL.BLUR_SKD.SNAPSHOT_PERIOD = {skd.SNAPSHOT_PERIOD} must be >= 1 and "
                         f"MODEL.BLUR_SKD.WARMUP_ITERS = {skd.WARMUP_ITERS} >= 0")
    if skd.TEMPERATURE <= 0:
        raise ValueError(f"MODEL.BLUR_SKD.TEMPERATURE = {skd.TEMPERATURE} must be > 0")
    if cfg.MODEL.DEBLUR.BOTTLENECK_CHANNELS <= 0:
        raise ValueError(f"MODEL.DEBLUR.BOTTLENECK_CHANNELS = {cfg.MODEL.DEBLUR.BOTTLENECK_CHANNELS} must be > 0")

    from .datasets import check_blurred_copies

    check_blurred_copies(cfg)  # the evaluation copies named in DATASETS blur like training


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)
