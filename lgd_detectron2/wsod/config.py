"""Config keys of weakly supervised detection (MODEL.WSOD, TEST.WSOD) and their validation.

The model: ``WeaklySupervisedRCNN`` (stock ResNet / FPN backbone, precomputed proposals) with the
``MILROIHeads`` ROI head: WSDDN + OICR refinements, optionally SLV's re-classification and
re-localisation branch and the SD attention loss (Chen et al.; shared/specs/other-skd.md section 3).
"""
from detectron2.config import CfgNode as CN

ARCH = "WeaklySupervisedRCNN"


def add_wsod_config(cfg):
    _C = cfg
    _C.MODEL.WSOD = CN()
    # OICR: K instance-classifier refinement branches, each supervised by the previous one's
    # top-scoring proposal per image class (Tang et al. 2017); K = 3 as in SLV.
    _C.MODEL.WSOD.NUM_REFINEMENTS = 3
    # A proposal takes the class of its best-overlapping seed when IoU >= this, else background.
    _C.MODEL.WSOD.REFINE_IOU = 0.5
    # Which scores the detections take at test time: "auto" (the SLV branch when it is on, else
    # the mean of the refinement branches), "refinement" or "slv".
    _C.MODEL.WSOD.TEST_BRANCH = "auto"

    # SLV: spatial likelihood voting (Chen et al., CVPR 2020).
    _C.MODEL.WSOD.SLV = CN()
    _C.MODEL.WSOD.SLV.ENABLED = False
    # A proposal votes for class c (image tag) when its refinement score for c exceeds this.
    _C.MODEL.WSOD.SLV.VOTE_SCORE_THRESH = 0.001
    # Side of a cell of the likelihood map, in input pixels.
    _C.MODEL.WSOD.SLV.MAP_STRIDE = 4
    # Pseudo boxes from the normalised map M_c: "threshold" (cells with M_c >= THRESHOLD) or
    # "adaptive" (per map, the threshold that best separates its voted values, Otsu's criterion).
    # "top_proposal": no voting; each image class's top proposal of the refinements' mean (OICR's
    # own seeds) trains the same re-classification + regression branch: the control that gives
    # OICR SLV's box regression without SLV's pseudo boxes (no maps, so no SD).
    _C.MODEL.WSOD.SLV.PSEUDO_BOXES = "threshold"
    _C.MODEL.WSOD.SLV.THRESHOLD = 0.5
    # Connected regions smaller than this fraction of the map's largest region give no box.
    _C.MODEL.WSOD.SLV.MIN_REGION_FRACTION = 0.1
    # Weight of the re-classification + re-localisation loss (Fast R-CNN losses on the pseudo boxes).
    _C.MODEL.WSOD.SLV.LOSS_WEIGHT = 1.0

    # SD: the likelihood maps supervise the backbone (self-distillation, Chen et al. 2021).
    _C.MODEL.WSOD.SD = CN()
    _C.MODEL.WSOD.SD.ENABLED = False
    _C.MODEL.WSOD.SD.LOSS_WEIGHT = 1.0
    # Backbone features whose spatial attention (channel mean of squares) is regressed onto the
    # class-agnostic likelihood map; empty = the ROI head's IN_FEATURES.
    _C.MODEL.WSOD.SD.IN_FEATURES = []

    _C.TEST.WSOD = CN()
    # VOC2007's 11-point AP (True) or the area under the interpolated curve (VOC2010+).
    _C.TEST.WSOD.VOC07_METRIC = True
    return cfg


def validate_wsod_config(cfg):
    w = cfg.MODEL.WSOD
    if cfg.MODEL.META_ARCHITECTURE != ARCH:
        return cfg
    if w.NUM_REFINEMENTS < 1:
        raise ValueError(f"MODEL.WSOD.NUM_REFINEMENTS = {w.NUM_REFINEMENTS} must be >= 1")
    if not 0 < w.REFINE_IOU <= 1 or not 0 < w.SLV.THRESHOLD < 1:
        raise ValueError(f"MODEL.WSOD.REFINE_IOU = {w.REFINE_IOU} must be in (0, 1] and "
                         f"MODEL.WSOD.SLV.THRESHOLD = {w.SLV.THRESHOLD} in (0, 1)")
    if w.TEST_BRANCH not in ("auto", "refinement", "slv"):
        raise ValueError(f"MODEL.WSOD.TEST_BRANCH = {w.TEST_BRANCH!r}; use 'auto', 'refinement' or 'slv'")
    if w.TEST_BRANCH == "slv" and not w.SLV.ENABLED:
        raise ValueError("MODEL.WSOD.TEST_BRANCH = 'slv' needs MODEL.WSOD.SLV.ENABLED True")
    if w.SLV.PSEUDO_BOXES not in ("threshold", "adaptive", "top_proposal"):
        raise ValueError(f"MODEL.WSOD.SLV.PSEUDO_BOXES = {w.SLV.PSEUDO_BOXES!r}; use 'threshold', "
                         "'adaptive' or 'top_proposal'")
    if w.SD.ENABLED and w.SLV.PSEUDO_BOXES == "top_proposal":
        raise ValueError("MODEL.WSOD.SD.ENABLED needs SLV's likelihood maps, which "
                         "MODEL.WSOD.SLV.PSEUDO_BOXES 'top_proposal' does not build; use 'threshold' or 'adaptive'")
    if w.SLV.MAP_STRIDE < 1 or not 0 <= w.SLV.MIN_REGION_FRACTION <= 1:
        raise ValueError(f"MODEL.WSOD.SLV.MAP_STRIDE = {w.SLV.MAP_STRIDE} must be >= 1 and "
                         f"MIN_REGION_FRACTION = {w.SLV.MIN_REGION_FRACTION} in [0, 1]")
    if w.SLV.LOSS_WEIGHT < 0 or w.SD.LOSS_WEIGHT < 0:
        raise ValueError("MODEL.WSOD.SLV.LOSS_WEIGHT and MODEL.WSOD.SD.LOSS_WEIGHT must be >= 0")
    if cfg.MODEL.PROPOSAL_GENERATOR.NAME != "PrecomputedProposals" or not cfg.MODEL.LOAD_PROPOSALS:
        raise ValueError(
            f"{ARCH} classifies precomputed proposals: set MODEL.LOAD_PROPOSALS True and "
            "MODEL.PROPOSAL_GENERATOR.NAME 'PrecomputedProposals' (files from tools/selective_search.py)"
        )
    if cfg.MODEL.ROI_HEADS.NAME != "MILROIHeads":
        raise ValueError(f"{ARCH} needs MODEL.ROI_HEADS.NAME 'MILROIHeads' (got {cfg.MODEL.ROI_HEADS.NAME!r})")
    for split in ("TRAIN", "TEST"):
        names, files = cfg.DATASETS[split], cfg.DATASETS[f"PROPOSAL_FILES_{split}"]
        if len(names) != len(files):
            raise ValueError(
                f"DATASETS.{split} has {len(names)} datasets but DATASETS.PROPOSAL_FILES_{split} "
                f"{len(files)} files: give one proposal file per dataset (tools/selective_search.py)"
            )
    sd_levels = list(w.SD.IN_FEATURES)
    missing = [f for f in sd_levels if f not in _backbone_outputs(cfg)]
    if missing:
        raise ValueError(f"MODEL.WSOD.SD.IN_FEATURES {missing} are not backbone outputs "
                         f"({_backbone_outputs(cfg)})")
    return cfg


def _backbone_outputs(cfg):
    if "fpn" in cfg.MODEL.BACKBONE.NAME.lower():
        return [f"p{i}" for i in range(2, 7)]
    return list(cfg.MODEL.RESNETS.OUT_FEATURES)
