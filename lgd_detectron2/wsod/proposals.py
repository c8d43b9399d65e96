"""Selective Search proposals (OpenCV contrib, ``cv2.ximgproc``) as Detectron2 proposal files.

``write_proposal_file(dataset_name, path)`` runs Selective Search on every image of a registered
dataset in worker processes (with a progress bar) and pickles what
``DATASETS.PROPOSAL_FILES_TRAIN/TEST`` expect: ``ids``, ``boxes`` (XYXY_ABS, original image
coordinates), ``objectness_logits`` (descending with the generator's order: Detectron2 sorts by
them and keeps the first PRECOMPUTED_PROPOSAL_TOPK_*) and ``bbox_mode``. Each image's boxes are
cached under ``$LGD_PROPOSAL_CACHE`` (default ~/.cache/lgd_detectron2/proposals) keyed by the
image file (path, size, modification time) and the generator settings, so a rerun, another
split sharing images, or a dataset's ``_weak`` copy costs no recomputation.
"""
import hashlib
import json
import os
import pickle
from multiprocessing import get_context

import numpy as np

MODES = ("fast", "quality")


def selective_search_boxes(image_bgr, mode="fast", max_proposals=2000, min_size=4):
    """[N, 4] float32 XYXY boxes, in the generator's order, without duplicates and without
    boxes whose shorter side is under ``min_size`` pixels."""
    import cv2

    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(image_bgr)
    if mode == "fast":
        search.switchToSelectiveSearchFast()
    elif mode == "quality":
        search.switchToSelectiveSearchQuality()
    else:
        raise ValueError(f"Selective Search mode {mode!r}; use one of {MODES}")
    rects = search.process().astype(np.float32).reshape(-1, 4)
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    keep = np.minimum(rects[:, 2], rects[:, 3]) >= min_size
    boxes = boxes[keep]
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)][:max_proposals]


def cache_root():
    return os.environ.get("LGD_PROPOSAL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "lgd_detectron2", "proposals")


def _cache_file(file_name, settings):
    stat = os.stat(file_name)
    key = json.dumps([os.path.abspath(file_name), stat.st_size, stat.st_mtime_ns, settings])
    digest = hashlib.sha1(key.encode()).hexdigest()
    return os.path.join(cache_root(), digest[:2], digest + ".npy")


def _proposals_of_image(job):
    file_name, settings = job
    import cv2

    cv2.setNumThreads(1)
    cached = _cache_file(file_name, settings)
    if os.path.isfile(cached):
        return np.load(cached)
    image = cv2.imread(file_name, cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image {file_name}")
    boxes = selective_search_boxes(image, **settings)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    partial = f"{cached}.{os.getpid()}.tmp.npy"
    np.save(partial, boxes)
    os.replace(partial, cached)
    return boxes


def compute_proposals(records, mode="fast", max_proposals=2000, min_size=4, workers=1, progress=True):
    """Boxes per record (list of [N, 4] arrays), computed in ``workers`` processes."""
    from tqdm import tqdm

    settings = {"mode": mode, "max_proposals": max_proposals, "min_size": min_size}
    jobs = [(r["file_name"], settings) for r in records]
    bar = dict(total=len(jobs), disable=not progress, desc="selective search", unit="img")
    if workers <= 1:
        return [b for b in tqdm(map(_proposals_of_image, jobs), **bar)]
    with get_context("spawn").Pool(workers) as pool:
        return list(tqdm(pool.imap(_proposals_of_image, jobs, chunksize=4), **bar))


def write_proposal_file(dataset_name, path, **kwargs):
    """Proposals for every image of the registered ``dataset_name``, pickled to ``path``;
    returns (the dataset's records, the boxes per record)."""
    from detectron2.data import DatasetCatalog
    from detectron2.structures import BoxMode

    records = DatasetCatalog.get(dataset_name)
    boxes = compute_proposals(records, **kwargs)
    empty = [r for r, b in zip(records, boxes) if len(b) == 0]
    if empty:
        raise ValueError(f"{dataset_name}: Selective Search found no proposal in image id "
                         f"{empty[0]['image_id']} ({empty[0]['file_name']}) and {len(empty) - 1} others")
    data = {
        "ids": [r["image_id"] for r in records],
        "boxes": boxes,
        "objectness_logits": [-np.arange(len(b), dtype=np.float32) for b in boxes],
        "bbox_mode": BoxMode.XYXY_ABS,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "wb") as f:
        pickle.dump(data, f)
    os.replace(partial, path)
    return records, boxes
