#!/usr/bin/env python
"""Write Selective Search proposal files for registered datasets (DATASETS.PROPOSAL_FILES_*).

  python tools/selective_search.py --dataset demo_shapes_train demo_shapes_val
  python tools/selective_search.py --voc-dataset voc07_trainval datasets/VOC2007 trainval \\
      --dataset voc07_trainval --mode quality --workers 8

Writes <output-dir>/<dataset>_ss_<mode>.pkl (default output dir: datasets/proposals). Images are
processed in --workers processes; each image's boxes are cached (lgd_detectron2.wsod.proposals),
so a rerun returns in seconds. A ``<name>_weak`` dataset uses the file of ``<name>``.
"""
import argparse
import os
import time

import numpy as np

import lgd_detectron2  # noqa: F401  (registers the built-in datasets)
from lgd_detectron2.data.register import add_dataset_arguments, register_datasets
from lgd_detectron2.wsod.evaluation import box_iou
from lgd_detectron2.wsod.proposals import MODES, write_proposal_file


def recall(records, boxes, iou=0.5):
    """Fraction of the records' ground-truth boxes that one of their proposals ``boxes`` overlaps
    with IoU >= iou (None for records without boxes)."""
    from detectron2.structures import BoxMode

    hits = total = 0
    for record, proposals in zip(records, boxes):
        gt = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in record.get("annotations", [])]
        if gt:
            total += len(gt)
            hits += int((box_iou(np.asarray(gt, dtype=np.float64), proposals).max(1) >= iou).sum())
    return hits / total if total else None


def proposal_path(output_dir, dataset, mode):
    return os.path.join(output_dir, f"{dataset}_ss_{mode}.pkl")


def main(argv=None):
    parser = add_dataset_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--dataset", nargs="+", required=True, help="registered dataset names")
    parser.add_argument("--output-dir", default="datasets/proposals")
    parser.add_argument("--mode", choices=MODES, default="fast",
                        help="OpenCV's fast (VOC: ~2k boxes) or quality strategy list")
    parser.add_argument("--max-proposals", type=int, default=2000)
    parser.add_argument("--min-size", type=int, default=4, help="drop boxes with a shorter side (px)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    register_datasets(args)
    for dataset in args.dataset:
        path = proposal_path(args.output_dir, dataset, args.mode)
        start = time.perf_counter()
        records, boxes = write_proposal_file(dataset, path, mode=args.mode, max_proposals=args.max_proposals,
                                             min_size=args.min_size, workers=args.workers)
        seconds = time.perf_counter() - start
        counts = [len(b) for b in boxes]
        found = recall(records, boxes)
        print(f"{dataset}: {len(counts)} images, {np.mean(counts):.0f} proposals per image "
              f"(min {min(counts)}, max {max(counts)}) -> {path} ({seconds:.1f} s)"
              + ("" if found is None else f"; recall of the ground-truth boxes at IoU 0.5: {100 * found:.1f}%"))


if __name__ == "__main__":
    main()
