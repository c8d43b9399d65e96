"""``WSODEvaluator``: VOC-style mAP@0.5 and CorLoc for any registered dataset.

Ground truth comes from the records of the dataset (for ``<name>_weak``, from ``<name>``; boxes
never pass through the model). CorLoc (Deselaers et al. 2012), the WSOD localisation metric on the
training split: for each class, the fraction of the images containing it whose top-scoring box of
that class overlaps one of its boxes with IoU > 0.5; averaged over classes. Reported for every
evaluated set: mAP is meant for the test split, CorLoc for the training split.

Matching follows the PASCAL VOC devkit (py-faster-rcnn's voc_eval.py, Detectron2's
``pascal_voc_evaluation.voc_eval``):

* a detection is matched to its best-overlapping box of the class and counts when IoU > 0.5;
* boxes marked ``difficult`` (the record annotations' ``"difficult": 1``, as the VOC folder loader
  stores them) are left out of the positives, and a detection matched to one is neither a true nor
  a false positive; for CorLoc an image whose objects of a class are all difficult does not count
  for that class (py-faster-rcnn-style roidbs, use_diff=False, drop difficult objects before the
  image tags are taken; PCL's dis_eval, which counts every image holding the class, differs here);
* the devkit's "+1" widths belong to its 1-based inclusive pixel coordinates. Records hold
  Detectron2's continuous frame (the VOC loader subtracts 1 from xmin/ymin; Detectron2's VOC
  evaluator adds it back to the detections), where the plain IoU below is exactly the devkit's: a
  VOC box [x1, x2] spans x2 - x1 + 1 pixels = x2 - (x1 - 1). Adding 1 again would count a pixel
  twice; COCO-style records have no such convention at all.
"""
import itertools
from collections import defaultdict

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm

from .datasets import ground_truth_dataset


def box_iou(a, b):
    """[len(a), len(b)] IoU of XYXY arrays (continuous coordinates; see the module docstring)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-12)


def voc_ap(recall, precision, use_07_metric=True):
    """VOC AP from a PR curve: 11-point (VOC2007) or area under the interpolated curve."""
    if use_07_metric:
        return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                              for t in np.arange(0.0, 1.1, 0.1)]))
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.where(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def _not_difficult(difficult, key, count):
    flags = None if difficult is None else difficult.get(key)
    return np.ones(count, dtype=bool) if flags is None else ~np.asarray(flags, dtype=bool).reshape(count)


def average_precision(detections, ground_truth, use_07_metric=True, iou_threshold=0.5, difficult=None):
    """AP of one class. detections: list of (image_id, score, box); ground_truth: image_id ->
    [G, 4] boxes; difficult: image_id -> [G] flags (absent: none difficult). Greedy matching by
    descending score, each box matched once, as the devkit's voc_eval; nan without a positive."""
    counted = {k: _not_difficult(difficult, k, len(g)) for k, g in ground_truth.items()}
    npos = sum(int(c.sum()) for c in counted.values())
    if npos == 0:
        return float("nan")
    detections = sorted(detections, key=lambda d: -d[1])
    used = {k: np.zeros(len(g), dtype=bool) for k, g in ground_truth.items()}
    tp = np.zeros(len(detections))
    fp = np.zeros(len(detections))
    for i, (image_id, _, box) in enumerate(detections):
        gt = ground_truth.get(image_id)
        if gt is None or len(gt) == 0:
            fp[i] = 1
            continue
        overlaps = box_iou(np.asarray(box, dtype=np.float64)[None], gt)[0]
        j = int(overlaps.argmax())
        if overlaps[j] <= iou_threshold:  # the devkit needs ovmax > ovthresh
            fp[i] = 1
        elif not counted[image_id][j]:
            continue  # matched a difficult box: neither TP nor FP
        elif used[image_id][j]:
            fp[i] = 1  # a duplicate
        else:
            used[image_id][j] = True
            tp[i] = 1
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
    recall = tp_cum / npos
    # ignored detections are in neither count (eps: the first ones may all be ignored)
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, use_07_metric)


def corloc(top_boxes, ground_truth, num_classes, iou_threshold=0.5, difficult=None):
    """Per-class CorLoc. top_boxes: (image_id, class) -> the top-scoring box; ground_truth:
    class -> image_id -> [G, 4]; difficult: class -> image_id -> [G] flags (absent: none).

    An image counts for a class when it has a non-difficult box of it; a hit is IoU > 0.5 with any
    of its boxes of the class (OICR/PCL's dis_eval matches all of them). Classes with no counted
    image give nan."""
    def hit(box, gt):
        return box is not None and box_iou(np.asarray(box, dtype=np.float64)[None], gt).max() > iou_threshold

    out = []
    for c in range(num_classes):
        flags = None if difficult is None else difficult[c]
        images = [i for i, g in ground_truth[c].items() if _not_difficult(flags, i, len(g)).any()]
        hits = [hit(top_boxes.get((i, c)), ground_truth[c][i]) for i in images]
        out.append(float(np.mean(hits)) if hits else float("nan"))
    return out


def ground_truth_boxes(dataset_name, num_classes):
    """(boxes, difficult) from the records holding ``dataset_name``'s boxes: class -> image_id ->
    [G, 4] XYXY boxes, and the matching [G] bool flags (the annotations' ``difficult``, default 0)."""
    boxes = [{} for _ in range(num_classes)]
    difficult = [{} for _ in range(num_classes)]
    for record in DatasetCatalog.get(ground_truth_dataset(dataset_name)):
        per_class = defaultdict(list)
        for ann in record.get("annotations", []):
            box = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
            per_class[ann["category_id"]].append((box, bool(ann.get("difficult", 0))))
        for c in range(num_classes):
            objects = per_class.get(c, [])
            image = record["image_id"]
            boxes[c][image] = np.asarray([b for b, _ in objects], dtype=np.float64).reshape(-1, 4)
            difficult[c][image] = np.asarray([d for _, d in objects], dtype=bool)
    return boxes, difficult


class WSODEvaluator(DatasetEvaluator):
    def __init__(self, dataset_name, use_07_metric=True):
        self.dataset_name = dataset_name
        self.classes = list(MetadataCatalog.get(dataset_name).thing_classes)
        self.use_07_metric = use_07_metric
        self.reset()

    def reset(self):
        self._detections = []  # (image_id, class, score, box)

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            instances = out["instances"].to(torch.device("cpu"))
            boxes = instances.pred_boxes.tensor.numpy()
            for box, score, cls in zip(boxes, instances.scores.tolist(), instances.pred_classes.tolist()):
                self._detections.append((inp["image_id"], cls, score, box))

    def evaluate(self):
        detections = list(itertools.chain(*comm.gather(self._detections, dst=0)))
        if not comm.is_main_process():
            return {}
        num = len(self.classes)
        gt, difficult = ground_truth_boxes(self.dataset_name, num)
        per_class = defaultdict(list)
        top = {}
        for image_id, cls, score, box in detections:
            per_class[cls].append((image_id, score, box))
            if (image_id, cls) not in top or score > top[(image_id, cls)][0]:
                top[(image_id, cls)] = (score, box)
        aps = [average_precision(per_class[c], gt[c], self.use_07_metric, difficult=difficult[c])
               for c in range(num)]
        cor = corloc({k: v[1] for k, v in top.items()}, gt, num, difficult=difficult)
        result = {"mAP50": 100 * float(np.nanmean(aps)), "CorLoc": 100 * float(np.nanmean(cor))}
        for name, ap, c in zip(self.classes, aps, cor):
            result[f"AP50-{name}"] = 100 * ap
            result[f"CorLoc-{name}"] = 100 * c
        return {"wsod": result}
