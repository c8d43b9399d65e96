"""UDFA's config keys (``MODEL.UDFA``) and their checks; ``add_distill_config`` adds them."""
from detectron2.config import CfgNode as CN


def add_udfa_config(cfg):
    """MODEL.UDFA: adversarial views, decoupled feature alignment (Xu et al. 2021; spec:
    shared/specs/other-skd.md section 2). TEST.ADV and TEST.PGD: the attacks of the ``<name>_adv``
    and ``<name>_pgd`` evaluation datasets, for any detector (independent of the training attack)."""
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
    # With AUX_BN: craft the attack through the auxiliary (adversarial) BatchNorm, as AdvProp and
    # the release's mixbn do (it switches to the adversarial BN before the attack's forward), at the
    # cost of one more forward and input backward. False: the first step reuses the clean pass's
    # graph (clean BatchNorm; later steps use the auxiliary BN).
    _C.MODEL.UDFA.ATTACK.THROUGH_AUX_BN = True

    # Evaluation attacks, separate from the training attack above: the same signed-gradient
    # iteration against the model under test, on its total detection loss; one node per suffix of
    # the attacked test sets:
    #   TEST.ADV  ``<name>_adv``: one step of 2 within eps 8, no random start: the release's
    #             "robust mAP" attack (its README). The step never reaches eps (a weak attack), but
    #             the numbers compare with the paper's and with earlier runs. Not PGD by default:
    #             PGD-10 costs ~8x (demo, 192 px, R-18, one CPU thread: ~2.4 s against ~0.3 s per
    #             image, ~6 min per 150-image evaluation), too much for every run's final evaluation.
    #   TEST.PGD  ``<name>_pgd``: PGD, 10 steps of 2 within eps 8 from a random start uniform in
    #             +-eps/2 (the release's random start): the budget binds.
    # SEED: each attacked batch runs under the seed SEED + (its index among the attacked batches
    # of that suffix): random start and RPN/RoI sampling repeat from one evaluation to the next.
    for name, steps, random_start in (("ADV", 1, False), ("PGD", 10, True)):
        node = CN()
        node.EPSILON = 8.0
        node.STEP_SIZE = 2.0
        node.STEPS = steps
        node.RANDOM_START = random_start
        node.SEED = 0
        setattr(_C.TEST, name, node)
    return cfg


def uses_teacher(cfg):
    c = cfg.MODEL.UDFA
    return c.KDFA_WEIGHT > 0 or c.CLEAN_KD_WEIGHT > 0


def validate_attack(node, key):
    """Checks of one attack node (``key``: its full name, for the errors)."""
    for name in ("EPSILON", "STEP_SIZE"):
        value = node[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{key}.{name} = {value!r} must be >= 0 (a number, in pixel units 0-255)")
    for name, low in (("STEPS", 1), ("SEED", 0)):
        if name not in node:
            continue
        value = node[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key}.{name} = {value!r} must be >= {low} (an integer)")
    if not isinstance(node.RANDOM_START, bool):
        raise ValueError(f"{key}.RANDOM_START = {node.RANDOM_START!r} must be True or False")


def validate_udfa_config(cfg):
    c = cfg.MODEL.UDFA
    validate_attack(c.ATTACK, "MODEL.UDFA.ATTACK")
    for name in ("ADV", "PGD"):
        validate_attack(cfg.TEST[name], f"TEST.{name}")
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
