#!/usr/bin/env python
"""Gradient norms of each training loss term of a blur self-guided (or KD) model, per parameter
group: the bottom-up trunk, the FPN, the deblurring blocks, the RPN and the box head. For reading
what each term pulls on (for example on the checkpoints of tools/compare_blur.py's runs).

  python tools/blur_gradient_norms.py --config-file configs/Demo/faster_rcnn_R_18_FPN_blur_skd.yaml \\
      --weights output/compare_blur/skd_base_seed1/model_final.pth --batches 4 [CONFIG OVERRIDES]

Each term's gradient is taken on its own (``torch.autograd.grad``) on training batches from the
config's paired-view loader, at the checkpoint's weights; the median over batches is printed
(L2 norm over the group's parameters, of the weighted term as the trainer sums it).
"""
import argparse
import json
import statistics

import torch

GROUPS = {"trunk": "backbone.bottom_up.", "fpn": "backbone.fpn_", "deblur": "backbone.deblur.",
          "rpn": "proposal_generator.", "box_head": "roi_heads."}


def load_checkpoint(config_file, weights, opts):
    """(cfg, model) of a config file with overrides (data loading in the main process) and the
    model built from it with ``weights`` loaded; denormals flushed for CPU speed."""
    import lgd_detectron2
    from detectron2.checkpoint import DetectionCheckpointer

    from lgd_detectron2.denormals import flush_denormals
    from lgd_detectron2.engine import Trainer

    flush_denormals()
    cfg = lgd_detectron2.get_distill_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts) + ["DATALOADER.NUM_WORKERS", 0])
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    return cfg, model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--iteration", type=int, default=100, help="schedule iteration the losses are taken at")
    parser.add_argument("--json", default=None, help="also write the medians here")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    from detectron2.utils.events import EventStorage

    from lgd_detectron2.engine import Trainer

    torch.manual_seed(0)
    cfg, model = load_checkpoint(args.config_file, args.weights, args.opts)
    model.train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loader = iter(Trainer.build_train_loader(cfg, sampler_seed=0))
    norms = {}
    for _ in range(args.batches):
        with EventStorage(args.iteration):
            losses = model(next(loader))
        for term, loss in losses.items():
            grads = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)
            for group, prefix in GROUPS.items():
                sq = sum(g.pow(2).sum().item() for (n, _), g in zip(params, grads)
                         if g is not None and n.startswith(prefix))
                norms.setdefault(term, {}).setdefault(group, []).append(sq ** 0.5)
    medians = {t: {g: statistics.median(v) for g, v in groups.items()} for t, groups in norms.items()}
    print("| loss term | " + " | ".join(GROUPS) + " |")
    print("|---" * (len(GROUPS) + 1) + "|")
    for term, groups in medians.items():
        print(f"| {term} | " + " | ".join(f"{groups[g]:.3g}" for g in GROUPS) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config_file, "weights": args.weights, "opts": args.opts,
                       "batches": args.batches, "median_grad_norm": medians}, f, indent=1)


if __name__ == "__main__":
    main()
