"""Blurred copies of registered datasets, for evaluation on blurred images (blur issue, item 3).

``register_blurred(name, severity)`` registers ``<name>_blur<severity>``: the same records and
metadata (so the same ground truth and COCO evaluator), with every image replaced by its blurred
copy, blurred with ``BlurKernelBank.kernel_for_image(image_id, severity, image_shape)`` (fixed
seed), written once to a cache folder. ``register_blurred_names(names, cfg)`` does this for every
name of the form ``<registered name>_blur<1-5>``, so ``DATASETS.TEST ("demo_shapes_val",
"demo_shapes_val_blur3")`` reports AP on sharp and blurred images in one ``--eval-only`` run.

The kernel sizes follow the same rule as training-time blur (``BlurDatasetMapper``): the extents
INPUT.BLUR.EXTENTS, in pixels of the stored image, or scaled by shorter side / REFERENCE_SIZE when
INPUT.BLUR.REFERENCE_SIZE > 0. A copy keeps the rule it was registered with (given by ``cfg`` or
``extents`` / ``reference_size``; the defaults otherwise), and ``validate_blur_config`` refuses a
config whose datasets name a copy registered with another rule. The cache folder is keyed by the
rule, so changed settings never reuse images blurred under other ones (the default rule keeps the
folder name it always had: ``<name>_s<N>_seed2022``).
"""
import functools
import hashlib
import logging
import os
import re

import cv2

from ..data.register import register_derived_dataset
from .kernels import DEFAULT_EXTENTS, BlurKernelBank, apply_blur, odd_extent

logger = logging.getLogger(__name__)

BLUR_SEED = 2022
DEFAULT_RULE = (DEFAULT_EXTENTS, 0)  # (extents, reference size)
# "<base>_blur<N>", alone or followed by a derived copy's suffix ("<base>_blur3_adv")
_NAME = re.compile(r"^(?P<copy>(?P<base>.+)_blur(?P<severity>[1-5]))(?P<rest>_.+)?$")
_RULES = {}  # "<base>_blur<N>" registered here -> the (extents, reference size) it blurs with


def blur_rule(cfg=None, extents=None, reference_size=None):
    """The kernel-size rule (extents made odd, reference size) of ``cfg.INPUT.BLUR`` (the
    defaults without a cfg), with ``extents`` / ``reference_size`` overriding it when given."""
    if cfg is not None:
        extents = cfg.INPUT.BLUR.EXTENTS if extents is None else extents
        reference_size = cfg.INPUT.BLUR.REFERENCE_SIZE if reference_size is None else reference_size
    extents = DEFAULT_EXTENTS if extents is None else extents
    return tuple(odd_extent(e) for e in extents), int(reference_size or 0)


@functools.lru_cache(maxsize=None)
def _bank(rule=DEFAULT_RULE):
    extents, reference_size = rule
    return BlurKernelBank(seed=BLUR_SEED, extents=extents, reference_size=reference_size)


def _cache_dir(name, severity, rule=DEFAULT_RULE):
    base = os.environ.get("LGD_BLUR_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "lgd_detectron2", "blurred")
    extents, reference_size = rule
    tag = "" if extents == DEFAULT_EXTENTS else "_ext" + "-".join(map(str, extents))
    tag += f"_ref{reference_size}" if reference_size else ""
    return os.path.join(base, f"{name}_s{severity}_seed{BLUR_SEED}{tag}")


def blurred_records(records, name, severity, rule=DEFAULT_RULE):
    """Copies of ``records`` whose ``file_name`` points to the blurred image (written if missing)."""
    folder = _cache_dir(name, severity, rule)
    os.makedirs(folder, exist_ok=True)
    out = []
    for record in records:
        source = record["file_name"]
        tag = hashlib.sha1(os.path.abspath(source).encode()).hexdigest()[:10]
        target = os.path.join(folder, f"{record['image_id']}_{tag}.png")
        if not os.path.isfile(target):
            image = cv2.imread(source, cv2.IMREAD_COLOR)
            if image is None:
                raise FileNotFoundError(f"{name}: cannot read image id {record['image_id']} ({source})")
            kernel = _bank(rule).kernel_for_image(record["image_id"], severity, image.shape)
            partial = f"{target}.{os.getpid()}.tmp.png"  # per process: DDP ranks may race
            cv2.imwrite(partial, apply_blur(image, kernel))
            os.replace(partial, target)
        out.append(dict(record, file_name=target))
    return out


def register_blurred(name, severity, extents=None, reference_size=None):
    """Register ``<name>_blur<severity>``. ``extents`` (px for severities 1-5) and
    ``reference_size`` (0: extents in pixels of the stored image; > 0: for a shorter side of that
    many px, scaled to each image) set its kernel sizes, as INPUT.BLUR.EXTENTS / REFERENCE_SIZE do;
    one not given keeps the copy's current value (the default for a new copy). Returns the name."""
    from detectron2.data import DatasetCatalog

    copy = f"{name}_blur{severity}"
    if copy in DatasetCatalog.list() and copy not in _RULES:
        return copy  # registered by someone else: not ours to change
    current_extents, current_reference = _RULES.get(copy, DEFAULT_RULE)
    rule = blur_rule(extents=current_extents if extents is None else extents,
                     reference_size=current_reference if reference_size is None else reference_size)
    if copy in _RULES and _RULES[copy] != rule:
        logger.info(f"{copy}: blur kernel extents {_RULES[copy][0]} / reference size "
                    f"{_RULES[copy][1]} -> {rule[0]} / {rule[1]}")
    _RULES[copy] = rule  # read when the copy loads: a re-registration with another rule applies
    return register_derived_dataset(
        copy, name, lambda records: blurred_records(records, name, severity, _RULES[copy]), "blur")


def register_blurred_names(names, cfg=None):
    """Register every ``<registered name>_blur<1-5>`` in ``names``, with the kernel-size rule of
    ``cfg`` (INPUT.BLUR.EXTENTS / REFERENCE_SIZE; without a cfg: a copy's current rule, the
    default for a new one), so evaluation copies blur like training does. A name that continues
    after the copy (``<registered name>_blur3_adv``) registers the copy too, with the same rule,
    for the derived copy that is made of it. Returns the copies registered."""
    from detectron2.data import DatasetCatalog

    rule = blur_rule(cfg) if cfg is not None else (None, None)
    done = []
    for match in filter(None, map(_NAME.match, names)):
        if match["rest"] and (match["base"] not in DatasetCatalog.list()
                              or (match["copy"] in DatasetCatalog.list() and match["copy"] not in _RULES)):
            continue  # not a blurred copy's derivative (or a name of someone else's)
        done.append(register_blurred(match["base"], int(match["severity"]), *rule))
    return done


def check_blurred_copies(cfg):
    """Refuse a config whose DATASETS name a blurred copy (or a copy derived from one) that was
    registered here with kernel sizes other than its INPUT.BLUR.EXTENTS / REFERENCE_SIZE: its
    evaluation images would not be blurred like the training images."""
    want = blur_rule(cfg)
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        match = _NAME.match(name)
        have = _RULES.get(match["copy"]) if match else None
        if have is not None and have != want:
            raise ValueError(
                f"dataset '{name}': its blurred copy '{match['copy']}' was registered with kernel "
                f"extents {list(have[0])} and reference size {have[1]}, but INPUT.BLUR.EXTENTS = "
                f"{list(want[0])} (made odd) and INPUT.BLUR.REFERENCE_SIZE = {want[1]}; register the "
                "config's datasets with lgd_detectron2.blur.register_blurred_names(names, cfg)"
            )
