"""SD: the likelihood maps of SLV supervise the backbone (Chen et al., self-distillation for WSOD).

The exact form is not published with code; ours (shared/specs/other-skd.md section 3, "my
reading"): a spatial attention map of a backbone feature F (C x H x W),
    A(x, y) = mean_c F_c(x, y)^2,  normalised by its maximum over the image,
is regressed (mean squared error) onto the class-agnostic likelihood map T = max_c M_c (image
classes only) resized to the feature's grid. T is a detached target produced by the network's own
later stage, so the loss reaches only the backbone, through F, and pushes its activations to cover
whole objects rather than their most discriminative parts.
"""
import torch
import torch.nn.functional as F


def spatial_attention(feature, eps=1e-6):
    """[N, H, W]: channel mean of squares, each image divided by its maximum."""
    attention = feature.pow(2).mean(1)
    return attention / (attention.flatten(1).max(1).values[:, None, None] + eps)


def likelihood_target(maps_per_image, padded_size, map_stride, feature_size):
    """[N, h, w] class-agnostic targets on the feature grid. ``maps_per_image``: per image the
    [K_i, H_i, W_i] likelihood maps on the image's own map grid (K_i may be 0)."""
    grid = (-(-padded_size[0] // map_stride), -(-padded_size[1] // map_stride))
    targets = []
    for maps in maps_per_image:
        canvas = maps.new_zeros(grid)
        if len(maps):
            h, w = maps.shape[-2:]
            canvas[:h, :w] = maps.max(0).values
        targets.append(canvas)
    stacked = torch.stack(targets)[:, None]
    return F.interpolate(stacked, size=feature_size, mode="bilinear", align_corners=False)[:, 0]


def sd_loss(features, maps_per_image, padded_size, map_stride):
    """Mean over ``features`` (the listed backbone levels) of the attention-to-likelihood MSE,
    over the images that have at least one class tag (an image without objects gives no target)."""
    has_target = torch.tensor([len(m) > 0 for m in maps_per_image])
    if not has_target.any():
        return sum(f.sum() * 0.0 for f in features)
    keep = has_target.nonzero()[:, 0]
    losses = []
    for feature in features:
        target = likelihood_target([maps_per_image[i] for i in keep.tolist()], padded_size,
                                   map_stride, feature.shape[-2:]).detach()
        attention = spatial_attention(feature[keep.to(feature.device)])
        losses.append(F.mse_loss(attention, target.to(attention.dtype)))
    return sum(losses) / len(losses)
