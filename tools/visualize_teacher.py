#!/usr/bin/env python
"""Show what LGD's label-guided teacher teaches: one PNG per FPN level with the image and its boxes,
the student's feature map, the teacher's knowledge map and the adapted student map.

Maps are channel-reduced as the root-mean-square over channels after instance normalisation (the
normalisation the distillation loss compares), drawn with one colour scale per level.

  python tools/visualize_teacher.py --config-file configs/Demo/faster_rcnn_R_18_FPN_lgd.yaml \\
      --weights output/demo/lgd_seed1/model_final.pth --dataset demo_shapes_val --index 0 \\
      --output output/teacher_maps
"""
import argparse
import os

import torch
import torch.nn.functional as F

import lgd_detectron2  # noqa: F401
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from lgd_detectron2.engine.trainer import _TestMapperWithAnnotations
from lgd_detectron2.fgfi.distiller import read_weights
from lgd_detectron2.lgd.config import is_lgd_config


def channel_rms(x):
    """(C, H, W) -> (H, W): RMS over channels of the instance-normalised map."""
    return F.instance_norm(x[None])[0].pow(2).mean(dim=0).sqrt()


@torch.no_grad()
def teacher_maps(model, inputs):
    images = model.preprocess_image(inputs)
    gt = [x["instances"].to(model.device) for x in inputs]
    features = model.backbone(images.tensor)
    teacher = model.distiller.teacher_features(features, gt, images.image_sizes)
    out = {}
    for level in model.distiller.levels:
        student = features[level][0]
        adapted = model.distiller.adapter(features[level])[0]
        out[level] = [channel_rms(m) for m in (student, teacher[level][0], adapted)]
    return images, out


def load_lgd_model(config_file, weights, opts, tool):
    """(cfg, model in eval mode) of an LGD training checkpoint (the teacher's weights included)."""
    cfg = lgd_detectron2.get_distill_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    if not is_lgd_config(cfg):
        raise SystemExit(f"{tool} needs an LGD config (MODEL.DISTILL.METHOD LGD)")
    model = build_model(cfg).eval()
    state = read_weights(weights)
    if not any(k.startswith("distiller.") for k in state):
        raise SystemExit(f"{weights} holds no LGD teacher (distiller.*): use a training checkpoint")
    model.load_state_dict(state)
    return cfg, model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True, help="an LGD checkpoint (with distiller.*)")
    parser.add_argument("--dataset", default="demo_shapes_val")
    parser.add_argument("--index", type=int, default=0, help="position of the image in the dataset")
    parser.add_argument("--output", default="output/teacher_maps")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, model = load_lgd_model(args.config_file, args.weights, args.opts, "visualize_teacher.py")
    record = DatasetCatalog.get(args.dataset)[args.index]
    inputs = [_TestMapperWithAnnotations(cfg, is_train=False)(record)]
    with EventStorage(0):
        images, maps = teacher_maps(model, inputs)

    os.makedirs(args.output, exist_ok=True)
    image = inputs[0]["image"].permute(1, 2, 0).numpy()[:, :, ::-1]  # BGR -> RGB
    boxes = inputs[0]["instances"].gt_boxes.tensor.numpy()
    for level, (student, teacher, adapted) in maps.items():
        vmax = float(max(m.max() for m in (student, teacher, adapted)))
        fig, axes = plt.subplots(1, 4, figsize=(14, 3.8))
        axes[0].imshow(image.astype("uint8"))
        for x0, y0, x1, y1 in boxes:
            axes[0].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="r", lw=1))
        axes[0].set_title(f"image {record.get('image_id')} with GT boxes")
        for ax, m, title in zip(axes[1:], (student, teacher, adapted),
                                ("student FPN", "teacher knowledge map", "adapted student")):
            im = ax.imshow(m.numpy(), vmin=0, vmax=vmax, cmap="viridis")
            ax.set_title(f"{level}: {title}")
        fig.colorbar(im, ax=axes[1:].tolist(), shrink=0.8)
        for ax in axes:
            ax.axis("off")
        path = os.path.join(args.output, f"teacher_{level}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        print("wrote", path)


if __name__ == "__main__":
    main()
