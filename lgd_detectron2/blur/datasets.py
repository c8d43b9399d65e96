"""Blurred copies of registered datasets, for evaluation on blurred images (blur issue, item 3).

``register_blurred(name, severity)`` registers ``<name>_blur<severity>``: the same records and
metadata (so the same ground truth and COCO evaluator), with every image replaced by its blurred
copy, blurred with ``BlurKernelBank.kernel_for_image(image_id, severity)`` (fixed seed), written
once to a cache folder. ``register_blurred_names(names)`` does this for every name of the form
``<registered name>_blur<1-5>``, so ``DATASETS.TEST ("demo_shapes_val", "demo_shapes_val_blur3")``
reports AP on sharp and blurred images in one ``--eval-only`` run.
"""
import functools
import hashlib
import os
import re

import cv2

from ..data.register import register_derived_dataset
from .kernels import BlurKernelBank, apply_blur

BLUR_SEED = 2022
_NAME = re.compile(r"^(?P<base>.+)_blur(?P<severity>[1-5])$")


@functools.lru_cache(maxsize=None)
def _bank():
    return BlurKernelBank(seed=BLUR_SEED)


def _cache_dir(name, severity):
    base = os.environ.get("LGD_BLUR_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "lgd_detectron2", "blurred")
    return os.path.join(base, f"{name}_s{severity}_seed{BLUR_SEED}")


def blurred_records(records, name, severity):
    """Copies of ``records`` whose ``file_name`` points to the blurred image (written if missing)."""
    folder = _cache_dir(name, severity)
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
            kernel = _bank().kernel_for_image(record["image_id"], severity)
            partial = f"{target}.{os.getpid()}.tmp.png"  # per process: DDP ranks may race
            cv2.imwrite(partial, apply_blur(image, kernel))
            os.replace(partial, target)
        out.append(dict(record, file_name=target))
    return out


def register_blurred(name, severity):
    return register_derived_dataset(f"{name}_blur{severity}", name,
                                    lambda records: blurred_records(records, name, severity), "blur")


def register_blurred_names(names):
    """Register every ``<registered name>_blur<1-5>`` in ``names``; returns the ones registered."""
    done = []
    for n in names:
        match = _NAME.match(n)
        if match:
            done.append(register_blurred(match["base"], int(match["severity"])))
    return done
