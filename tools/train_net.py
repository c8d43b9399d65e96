#!/usr/bin/env python
"""Train / evaluate the baseline, distilled and weakly supervised detectors (Detectron2's tools/train_net.py shape).

  python tools/train_net.py --config-file configs/Demo/faster_rcnn_R_18_FPN_lgd.yaml
  python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS path/to/model_final.pth
  python tools/train_net.py --config-file CFG --coco-dataset mytrain train.json images/ \\
      DATASETS.TRAIN '("mytrain",)' MODEL.ROI_HEADS.NUM_CLASSES 5
"""

import lgd_detectron2  # noqa: F401  (compat layer, registrations)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from lgd_detectron2.config import validate_config
from lgd_detectron2.blur import register_blurred_names
from lgd_detectron2.udfa.attack import register_adversarial_names
from lgd_detectron2.wsod import register_weak_names
from lgd_detectron2.data.register import add_dataset_arguments, register_datasets, register_first_names
from lgd_detectron2.denormals import flush_denormals
from lgd_detectron2.engine import Trainer


def build_parser():
    return add_dataset_arguments(default_argument_parser())


def setup(args):
    cfg = lgd_detectron2.get_distill_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    # "<dataset>_first<N>": the first N images of a registered dataset (before the copies below,
    # which can be made of it)
    register_first_names(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    # "<dataset>_blur<1-5>": a blurred copy of a registered dataset (evaluation on blurred images)
    register_blurred_names(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST), cfg)
    # "<dataset>_adv" / "<dataset>_pgd": evaluated on images attacked against the model (TEST.ADV / TEST.PGD)
    register_adversarial_names(list(cfg.DATASETS.TEST))
    # "<dataset>_weak": image-level labels only (weakly supervised detection)
    register_weak_names(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    validate_config(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    # Randomly initialised CPU training produces denormal floats that can slow a step
    # tenfold; flushing them to zero changes no result that matters (it is a no-op on GPU ops).
    # In every OpenMP thread: torch.set_flush_denormal alone reaches only the calling thread.
    flush_denormals()
    register_datasets(args)
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main():
    args = build_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
        dist_url=args.dist_url, args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
