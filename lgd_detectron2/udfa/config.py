"""UDFA's config keys (``MODEL.UDFA``) and their checks; ``add_distill_config`` adds them."""
from detectron2.config import CfgNode as CN


def add_udfa_config(cfg):
    """MODEL.UDFA: adversarial views, decoupled feature alignment (Xu et al. 2021; spec:
    shared/specs/other-skd.md section 2). MODEL.UDFA.ATTACK is also the attack of the ``<name>_adv``
    evaluation datasets, for any detector."""
    _C = cfg
    _C.MODEL.UDFA = CN()
    # Weights of the detection loss on the clean and on the adversarial images (spec: 0.5 each).
    # Adversarial training alone: CLEAN_LOSS_WEIGHT 0, ADV_LOSS_WEIGHT 1 and no alignment terms.
    _C.MODEL.UDFA.CLEAN_LOSS_WEIGHT = 0.5
    _C.MODEL.UDFA.ADV_LOSS_WEIGHT = 0.5
    # The three decoupled alignment terms (each: FG_WEIGHT * fg part + BG_WEIGHT * bg part):
    # KDFA  adversarial student maps -> frozen teacher's clean maps
    # SSFA  adversarial student maps -> the student's own clean maps (detached)
    # CLEAN_KD  clean student maps -> frozen teacher's clean maps
    _C.MODEL.UDFA.KDFA_WEIGHT = 0.5
    _C.MODEL.UDFA.SSFA_WEIGHT = 0.5
    _C.MODEL.UDFA.CLEAN_KD_WEIGHT = 0.5
    # Foreground / background weights (spec: VOC 1 / 6, COCO 5 / 30).
    _C.MODEL.UDFA.FG_WEIGHT = 1.0
    _C.MODEL.UDFA.BG_WEIGHT = 6.0
    # FPN levels aligned; empty = the levels the student's head reads.
    _C.MODEL.UDFA.IN_FEATURES = []
    # A GT box of side s = sqrt(area) is painted on aligned level
    # floor(log2(s / FINEST_SCALE)), clamped to the levels (the RoI-level rule; index 0 = the first
    # aligned level; with p2-p5 this is Detectron2's ROIPooler assignment).
    _C.MODEL.UDFA.FINEST_SCALE = 56.0
    # Separate BatchNorm statistics and affine parameters for adversarial inputs (AdvProp); the
    # deployed model keeps the clean BatchNorm only.
    _C.MODEL.UDFA.AUX_BN = False
    # The frozen teacher: a trained checkpoint of the same detector (built from its own YAML).
    # Needed when KDFA_WEIGHT or CLEAN_KD_WEIGHT > 0; SSFA alone needs none.
    _C.MODEL.UDFA.TEACHER = CN()
    _C.MODEL.UDFA.TEACHER.CONFIG_FILE = ""
    _C.MODEL.UDFA.TEACHER.WEIGHTS = ""
    _C.MODEL.UDFA.TEACHER.ALLOW_RANDOM_INIT = False
    # Signed-gradient attack on the raw 0-255 input (before pixel normalisation), target = the
    # total detection loss: x <- clip_[0,255](clip_{x0 +- EPSILON}(x + STEP_SIZE * sign(grad))),
    # STEPS times (1 = FGSM-like, the spec's; more = PGD), optionally from a uniform random start
    # in +-EPSILON/2.
    _C.MODEL.UDFA.ATTACK = CN()
    _C.MODEL.UDFA.ATTACK.EPSILON = 8.0
    _C.MODEL.UDFA.ATTACK.STEP_SIZE = 2.0
    _C.MODEL.UDFA.ATTACK.STEPS = 1
    _C.MODEL.UDFA.ATTACK.RANDOM_START = False
    return cfg


def uses_teacher(cfg):
    c = cfg.MODEL.UDFA
    return c.KDFA_WEIGHT > 0 or c.CLEAN_KD_WEIGHT > 0


def validate_udfa_config(cfg):
    c = cfg.MODEL.UDFA
    a = c.ATTACK
    if a.EPSILON < 0:
        raise ValueError(f"MODEL.UDFA.ATTACK.EPSILON = {a.EPSILON} must be >= 0 (pixel units, 0-255)")
    if a.STEP_SIZE < 0:
        raise ValueError(f"MODEL.UDFA.ATTACK.STEP_SIZE = {a.STEP_SIZE} must be >= 0 (pixel units)")
    if a.STEPS < 1:
        raise ValueError(f"MODEL.UDFA.ATTACK.STEPS = {a.STEPS} must be >= 1")
    for key in ("CLEAN_LOSS_WEIGHT", "ADV_LOSS_WEIGHT", "KDFA_WEIGHT", "SSFA_WEIGHT",
                "CLEAN_KD_WEIGHT", "FG_WEIGHT", "BG_WEIGHT"):
        if c[key] < 0:
            raise ValueError(f"MODEL.UDFA.{key} = {c[key]} must be >= 0")
    if c.FINEST_SCALE <= 0:
        raise ValueError(f"MODEL.UDFA.FINEST_SCALE = {c.FINEST_SCALE} must be > 0")
    distilled = cfg.MODEL.META_ARCHITECTURE.startswith("Distill")
    if not (distilled and cfg.MODEL.DISTILL.METHOD == "UDFA"):
        return
    if "fpn" not in cfg.MODEL.BACKBONE.NAME.lower():
        raise ValueError(f"UDFA aligns FPN maps; MODEL.BACKBONE.NAME = {cfg.MODEL.BACKBONE.NAME!r} "
                         "is not an FPN backbone")
    if uses_teacher(cfg) and not c.TEACHER.ALLOW_RANDOM_INIT and not (c.TEACHER.CONFIG_FILE and c.TEACHER.WEIGHTS):
        raise ValueError(
            f"MODEL.UDFA.KDFA_WEIGHT = {c.KDFA_WEIGHT} and MODEL.UDFA.CLEAN_KD_WEIGHT = "
            f"{c.CLEAN_KD_WEIGHT} need a teacher: set MODEL.UDFA.TEACHER.CONFIG_FILE and "
            "MODEL.UDFA.TEACHER.WEIGHTS (a trained checkpoint of the same detector), or set both "
            "weights to 0 (SSFA only: no teacher)"
        )
