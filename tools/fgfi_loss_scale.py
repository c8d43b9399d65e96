#!/usr/bin/env python
"""Pick FGFI's LOSS_WEIGHT so the imitation loss starts at a chosen size (issue: "comparable to
the detection loss").

FGFI's adapters start near zero (N(0, 1e-4)), so when imitation switches on the unweighted loss is
  L_imit(0) = sum over positive locations of ||t||^2 / (2 N_p),
half the mean squared norm of the teacher's feature vector at the imitated locations: a property
of the teacher and the data alone. This tool builds the FGFI model of a config (teacher with its
weights), zeroes the adapters, runs training-mode forwards on a few batches of the training set,
and prints L_imit(0) and the weight that makes LOSS_WEIGHT * L_imit(0) equal --target (e.g. the
baseline's detection loss at iteration WARMUP_ITERS, read from its metrics.json).

  python tools/fgfi_loss_scale.py --config-file configs/Demo/faster_rcnn_R_18_FPN_fgfi.yaml \\
      --batches 5 --target 0.63 MODEL.FGFI.TEACHER.WEIGHTS output/compare/teacher_seed1/model_final.pth
"""
import argparse
import statistics

import torch

import lgd_detectron2  # noqa: F401  (compat layer, registrations)
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from lgd_detectron2.config import get_distill_cfg, validate_config


@torch.no_grad()
def starting_imitation_loss(model, batch, weight, iteration):
    """Unweighted imitation loss of ``batch`` with the adapters set to zero (FGFI model, train
    mode, ``iteration`` past the warm-up)."""
    for conv in model.distiller.adapters.values():
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    with EventStorage(iteration):
        return model(batch)["loss_fgfi_imitation"].item() / weight


def starting_imitation_losses(cfg, batches):
    """``starting_imitation_loss`` on the first ``batches`` batches of the training set."""
    model = build_model(cfg).train()
    loader = iter(build_detection_train_loader(cfg))
    return [
        starting_imitation_loss(model, next(loader), cfg.MODEL.FGFI.LOSS_WEIGHT, cfg.MODEL.FGFI.WARMUP_ITERS)
        for _ in range(batches)
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--target", type=float, default=1.0,
                        help="wanted starting size of the weighted imitation loss")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    cfg = get_distill_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.DATALOADER.NUM_WORKERS = 0
    validate_config(cfg)
    if cfg.MODEL.DISTILL.METHOD != "FGFI" or cfg.MODEL.FGFI.LOSS_WEIGHT <= 0:
        raise SystemExit("the config must train FGFI with a positive MODEL.FGFI.LOSS_WEIGHT")
    torch.manual_seed(0)
    values = starting_imitation_losses(cfg, args.batches)
    raw = statistics.mean(values)
    print(f"L_imit(0) over {len(values)} batches: mean {raw:.2f} "
          f"(min {min(values):.2f}, max {max(values):.2f})")
    print(f"LOSS_WEIGHT {cfg.MODEL.FGFI.LOSS_WEIGHT:g} starts the weighted loss at "
          f"{cfg.MODEL.FGFI.LOSS_WEIGHT * raw:.3f}")
    print(f"LOSS_WEIGHT for a start of {args.target:g}: {args.target / raw:.3g}")


if __name__ == "__main__":
    main()
