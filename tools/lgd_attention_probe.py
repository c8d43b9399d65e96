#!/usr/bin/env python
"""Does LGD's relation attention single out each object's own label?

With the default interaction pattern ("stuGuided") an object's vector is a mix of the label
embeddings of its image, weighted by the attention from its appearance (query) to the labels (keys).
This probe runs the self-teacher of an LGD checkpoint on a few images with their ground truth and
reports, per FPN level, the weight each object puts on its own label (averaged over the heads)
against 1/N, N the labels it can attend to (its image's objects, context object included): an own
weight near 1/N means the object's vector is an even mixture of every label in its image, and the
maps carry where the objects are but not which class each one is.

  python tools/lgd_attention_probe.py --config-file configs/Demo/faster_rcnn_R_18_FPN_lgd.yaml \\
      --weights output/demo/faster_rcnn_R_18_FPN_lgd/model_final.pth [--dataset demo_shapes_val]
      [--images 8] [--json out.json]
"""
import argparse
import json
import statistics

import torch

import lgd_detectron2  # noqa: F401  (compat layer, registrations)

from detectron2.data import DatasetCatalog

from lgd_detectron2.engine.trainer import _TestMapperWithAnnotations
from visualize_teacher import load_lgd_model


@torch.no_grad()
def probe(model, inputs):
    """{level: {"own": mean own-label weight, "uniform": mean 1/N, "above_uniform": fraction of
    objects whose own weight exceeds 1/N, "objects": count}} over objects in images with >= 2
    labels (with one label the weight is 1 whatever the attention)."""
    images = model.preprocess_image(inputs)
    gt = [x["instances"].to(model.device) for x in inputs]
    features = model.backbone(images.tensor)
    teacher = model.distiller.self_teacher
    weights = teacher.own_label_attention({l: features[l] for l in teacher.strides}, gt, images.image_sizes)
    report = {}
    for level, (own, uniform) in weights.items():
        keep = uniform < 1
        own, uniform = own[keep], uniform[keep]
        report[level] = {
            "own": own.mean().item() if len(own) else float("nan"),
            "uniform": uniform.mean().item() if len(own) else float("nan"),
            "above_uniform": (own > uniform).float().mean().item() if len(own) else float("nan"),
            "objects": len(own),
        }
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True, help="an LGD training checkpoint (with distiller.*)")
    parser.add_argument("--dataset", default="demo_shapes_val")
    parser.add_argument("--images", type=int, default=8, help="the first N images of the dataset")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cfg, model = load_lgd_model(args.config_file, args.weights, args.opts, "lgd_attention_probe.py")
    if cfg.MODEL.LGD.INTERACT_PATTERN != "stuGuided":
        raise SystemExit("the probe reads the attention from appearance to labels: INTERACT_PATTERN stuGuided")
    mapper = _TestMapperWithAnnotations(cfg, is_train=False)
    inputs = [mapper(r) for r in DatasetCatalog.get(args.dataset)[: args.images]]
    report = probe(model, inputs)
    print(f"own-label attention weight vs 1/N ({args.dataset}, first {args.images} images, objects in "
          "images with >= 2 labels):")
    print("| level | objects | mean own weight | mean 1/N | own > 1/N |")
    print("|---|---|---|---|---|")
    for level, r in report.items():
        print(f"| {level} | {r['objects']} | {r['own']:.3f} | {r['uniform']:.3f} | {r['above_uniform']:.0%} |")
    own = statistics.mean(r["own"] for r in report.values())
    uniform = statistics.mean(r["uniform"] for r in report.values())
    print(f"all levels: own {own:.3f} vs 1/N {uniform:.3f} (ratio {own / uniform:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
