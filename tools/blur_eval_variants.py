#!/usr/bin/env python
"""Where a blur model's inference differs from its training: bbox AP of one checkpoint evaluated
as stock inference and with one thing changed, plus the RPN's recall, on one dataset.

Variants:
  stock           Detectron2's inference (eval mode everywhere)
  batch_stats     the BatchNorm layers of the deblurring blocks use each test batch's own
                  statistics (as in training) instead of their running averages
  no_deblur       the deblurring blocks skipped (the sharp view's training path: FPN only)
  gt_proposals    the box head classifies the ground-truth boxes as its only proposals
                  (recall of the RPN left out: AP of the box head and features alone)
RPN recall: the fraction of ground-truth boxes that a proposal of the stock inference covers with
IoU >= 0.5 (the RPN's test-time proposals, POST_NMS_TOPK_TEST of them per image).

  python tools/blur_eval_variants.py --config-file configs/Demo/faster_rcnn_R_18_FPN_blur_skd.yaml \\
      --weights output/compare_blur/skd_frozen_bn_seed1/model_final.pth [--dataset demo_shapes_val] \\
      [--json out.json] [CONFIG OVERRIDES]
"""
import argparse
import contextlib
import json

import torch


@contextlib.contextmanager
def deblur_batch_stats(model):
    """BatchNorm of the deblurring blocks on batch statistics (as in training) also in eval mode,
    which ``inference_on_dataset`` sets: without running averages PyTorch's BatchNorm normalises
    by the batch's own; they are put back afterwards."""
    norms = [m for m in model.backbone.deblur.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.running_mean, m.running_var) for m in norms]
    for m in norms:
        m.running_mean = m.running_var = None
    try:
        yield len(norms)
    finally:
        for m, (mean, var) in zip(norms, saved):
            m.running_mean, m.running_var = mean, var


@contextlib.contextmanager
def without_deblur(model):
    backbone = model.backbone
    backbone.forward = backbone.forward_without_deblur
    try:
        yield
    finally:
        del backbone.forward


class GTProposals:
    """Wraps a model so that its box head sees the ground-truth boxes as the only proposals."""

    def __init__(self, model):
        self.model = model

    def __call__(self, inputs):
        from detectron2.structures import Instances

        m = self.model
        images = m.preprocess_image(inputs)
        features = m.backbone(images.tensor)
        proposals = []
        for x, size in zip(inputs, images.image_sizes):
            gt = x["instances"].to(m.device)
            scale_y, scale_x = size[0] / gt.image_size[0], size[1] / gt.image_size[1]
            boxes = gt.gt_boxes.clone()
            boxes.scale(scale_x, scale_y)
            p = Instances(size)
            p.proposal_boxes = boxes
            p.objectness_logits = torch.ones(len(boxes), device=m.device)
            proposals.append(p)
        results, _ = m.roi_heads(images, features, proposals, None)
        return m._postprocess(results, inputs, images.image_sizes)


def rpn_recall(model, loader, iou=0.5):
    from detectron2.structures import pairwise_iou

    found = total = 0
    with torch.no_grad():
        for inputs in loader:
            images = model.preprocess_image(inputs)
            proposals, _ = model.proposal_generator(images, model.backbone(images.tensor), None)
            for x, p, size in zip(inputs, proposals, images.image_sizes):
                gt = x["instances"].gt_boxes.clone()
                gt.scale(size[1] / x["instances"].image_size[1], size[0] / x["instances"].image_size[0])
                total += len(gt)
                if len(gt) and len(p):
                    found += int((pairwise_iou(gt.to(p.proposal_boxes.device), p.proposal_boxes).max(1).values >= iou).sum())
    return found / max(total, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--dataset", default="demo_shapes_val")
    parser.add_argument("--json", default=None)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    import lgd_detectron2  # noqa: F401  (first: it supplies Detectron2's missing C++ ops)
    from detectron2.data import DatasetMapper, build_detection_test_loader
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    from blur_gradient_norms import load_checkpoint

    cfg, model = load_checkpoint(args.config_file, args.weights, args.opts)
    model.eval()
    loader = build_detection_test_loader(cfg, args.dataset, mapper=_WithGroundTruth(DatasetMapper(cfg, is_train=False)))

    def ap(runner):  # the model in eval mode ignores the inputs' "instances"
        return inference_on_dataset(runner, loader, COCOEvaluator(args.dataset, output_dir=None))["bbox"]["AP"]

    report = {"stock": ap(model)}
    with deblur_batch_stats(model) as count:
        report["batch_stats"] = ap(model) if count else None
    with without_deblur(model):
        report["no_deblur"] = ap(model)
    report["gt_proposals"] = ap(GTProposals(model))
    report["rpn_recall"] = rpn_recall(model, loader)
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


class _WithGroundTruth:
    """The test mapper, plus the image's ground-truth ``instances`` in its original coordinates."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, record):
        from detectron2.data import detection_utils as utils

        out = self.mapper(dict(record))
        out["instances"] = utils.annotations_to_instances(record.get("annotations", []),
                                                          (record["height"], record["width"]))
        return out


if __name__ == "__main__":
    main()
