"""Config keys of lgd-detectron2: ``add_distill_config(cfg)`` must run before ``merge_from_file``.
It composes the shared keys with each method's own (``<method>/config.py``)."""
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .fcos import add_fcos_config
from .lgd.config import add_lgd_config, validate_lgd_config
from .udfa.config import add_udfa_config, validate_udfa_config
from .wsod.config import add_wsod_config, validate_wsod_config


def add_distill_config(cfg):
    """Add MODEL.DISTILL (shared), SOLVER.AMP.DTYPE, MODEL.FCOS, and each method's keys from its
    own package: MODEL.LGD (``lgd.config``), MODEL.FGFI (``fgfi.config``), INPUT.BLUR / MODEL.DEBLUR
    / MODEL.BLUR_SKD (``blur.config``), MODEL.UDFA / TEST.ADV / TEST.PGD (``udfa.config``) and
    MODEL.WSOD / TEST.WSOD (``wsod.config``), with their defaults, in place."""
    # imported here: the method packages import this module (num_classes_key)
    from .blur.config import add_blur_config
    from .fgfi.config import add_fgfi_config

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

    add_fgfi_config(_C)

    # ---------------- training loop ----------------
    # Autocast dtype when SOLVER.AMP.ENABLED: "float16" (with a gradient scaler) or "bfloat16"
    # (fp32's exponent range: no scaler, and a randomly initialised detector does not overflow).
    _C.SOLVER.AMP.DTYPE = "float16"

    add_blur_config(_C)
    add_udfa_config(_C)
    add_wsod_config(_C)
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
    from .blur.config import validate_blur_config
    from .fgfi.config import validate_fgfi_config

    validate_lgd_config(cfg)
    check_native_ops_for(cfg, "the config")
    validate_fgfi_config(cfg)
    if cfg.SOLVER.AMP.DTYPE not in ("float16", "bfloat16"):
        raise ValueError(f"SOLVER.AMP.DTYPE = {cfg.SOLVER.AMP.DTYPE!r}; use 'float16' or 'bfloat16'")
    if cfg.SOLVER.MAX_ITER <= 0:
        raise ValueError(f"SOLVER.MAX_ITER = {cfg.SOLVER.MAX_ITER} must be > 0")
    validate_blur_config(cfg)
    validate_udfa_config(cfg)
    validate_wsod_config(cfg)
    return cfg


def check_native_ops_for(cfg, what):
    """Deformable convolution needs Detectron2's compiled ops, which run it on CUDA only: refuse
    such a config before anything is built when this Detectron2 has none (the PyPI route) or the
    device is not CUDA, naming the key."""
    from .compat import has_native_ops

    stages = list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE)
    if not any(stages):
        return
    if not has_native_ops():
        raise ValueError(
            f"{what} sets MODEL.RESNETS.DEFORM_ON_PER_STAGE = {stages}: deformable convolution "
            "needs Detectron2 built with its C++ ops (detectron2._C), which this installation "
            "lacks; see 'Installing with upstream Detectron2' in README.md"
        )
    if not str(cfg.MODEL.DEVICE).startswith("cuda"):
        raise ValueError(
            f"{what} sets MODEL.RESNETS.DEFORM_ON_PER_STAGE = {stages} with MODEL.DEVICE = "
            f"{cfg.MODEL.DEVICE!r}: Detectron2's deformable convolution runs on CUDA only"
        )
