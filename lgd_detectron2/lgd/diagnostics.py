"""What LGD's self-teacher knows, measured at every evaluation of a training run.

* ``ClassAgnosticCOCOEvaluator``: Detectron2's COCOEvaluator that also reports ``AP_agnostic`` and
  ``AP50_agnostic``: the same detections and ground truth re-scored with every class merged into
  one (does a model find the objects, whatever it calls them?).
* ``teacher_inference`` / ``teacher_results_beside``: the trainer evaluates the self-teacher oracle
  (MODEL.LGD.EVAL_TEACHER: the student's head on the teacher's maps, built from the ground truth)
  like the student and reports it as ``teacher_<task>/<metric>`` beside ``<task>/<metric>``.
  Detections of one object under two classes count once per class, so the class-agnostic AP
  counts the extra one as a false positive.
* The box head's foreground classification accuracy of both is logged by Detectron2 during
  training: ``fast_rcnn/fg_cls_accuracy`` (student) and ``tea/fast_rcnn/fg_cls_accuracy``
  (teacher) in metrics.json.
"""
import contextlib
import copy
import io
import itertools

import numpy as np

from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm


def class_agnostic_ap(coco_gt, detections, img_ids=None):
    """(AP, AP50) in percent of COCO-format ``detections`` (list of dicts with image_id, bbox,
    score) against the COCO api ``coco_gt``, with every category merged into one; scored on
    ``img_ids`` only when given (as COCOEvaluator.evaluate(img_ids) does)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return 0.0, 0.0
    dataset = copy.deepcopy(coco_gt.dataset)
    dataset["categories"] = [{"id": 1, "name": "object"}]
    for ann in dataset["annotations"]:
        ann["category_id"] = 1
    merged = [dict(d, category_id=1) for d in detections]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = gt.loadRes(merged)
        ev = COCOeval(gt, dt, "bbox")
        if img_ids is not None:
            ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = np.maximum(ev.stats[:2], 0)  # -1 (no ground truth) -> 0
    return float(stats[0] * 100), float(stats[1] * 100)


class ClassAgnosticCOCOEvaluator(COCOEvaluator):
    """COCOEvaluator + ``bbox/AP_agnostic`` and ``bbox/AP50_agnostic``."""

    def evaluate(self, img_ids=None):
        predictions = self._predictions
        if self._distributed:  # every process takes part in the gather, as in super().evaluate
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
        results = super().evaluate(img_ids)
        if not results or "bbox" not in results:
            return results
        detections = [d for p in predictions for d in p.get("instances", [])]
        ap, ap50 = class_agnostic_ap(self._coco_api, detections, img_ids)
        results["bbox"]["AP_agnostic"], results["bbox"]["AP50_agnostic"] = ap, ap50
        return results


def is_lgd_model(model):
    distiller = getattr(model, "distiller", None)
    return distiller is not None and type(distiller).__name__ == "LGD"


@contextlib.contextmanager
def teacher_inference(model):
    """Inside the block the LGD model's evaluation is its self-teacher oracle."""
    distiller = model.distiller
    before = distiller.eval_teacher
    distiller.eval_teacher = True
    try:
        yield
    finally:
        distiller.eval_teacher = before


def teacher_results_beside(student_results, teacher_results):
    """Detectron2's results dict (task -> metrics, or dataset -> task -> metrics) with the
    teacher's entries added under ``teacher_<key>``."""
    out = dict(student_results)
    for key, value in teacher_results.items():
        out[f"teacher_{key}"] = value
    return out
