"""Spatial likelihood voting (SLV, Chen et al. CVPR 2020) and pseudo boxes from its maps.

Per image and per image-level class c, every proposal whose score s_{r,c} exceeds a threshold adds
s_{r,c} to each cell of a map M_c that its box covers; M_c is min-max normalised to [0, 1]
(the likelihood map), binarised, and the bounding rectangle of each connected region is a pseudo
box of class c. The paper's binarisation is a fixed threshold; the "adaptive search" variant of the
survey's table is unspecified, and ours picks, per map, the threshold that maximises the
between-class variance of the voted cells (Otsu's criterion).
"""
import cv2
import numpy as np
import torch


def vote_maps(boxes, scores, grid_size, stride, score_thresh):
    """Likelihood maps [K, H, W] on a grid of ``stride``-pixel cells.

    boxes: [R, 4] XYXY in pixels; scores: [R, K] (one column per class to vote for). A box covers
    the cells whose centres it contains (at least one cell). Each map is min-max normalised; a map
    with no vote stays 0. Summed-area accumulation: O(R + H * W) per class.
    """
    height, width = grid_size
    num_maps = scores.shape[1]
    if num_maps == 0:
        return scores.new_zeros((0, height, width))
    cells = boxes / stride
    x0 = cells[:, 0].round().clamp(0, width - 1).long()
    y0 = cells[:, 1].round().clamp(0, height - 1).long()
    x1 = torch.maximum(cells[:, 2].round().long().clamp(max=width), x0 + 1)
    y1 = torch.maximum(cells[:, 3].round().long().clamp(max=height), y0 + 1)
    votes = torch.where(scores > score_thresh, scores, torch.zeros_like(scores))  # [R, K]
    diff = scores.new_zeros((num_maps, height + 1, width + 1))
    k = torch.arange(num_maps, device=scores.device)[:, None].expand(-1, len(boxes))
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        diff.index_put_((k, ys[None].expand_as(k), xs[None].expand_as(k)), sign * votes.t(),
                        accumulate=True)
    maps = diff.cumsum(1).cumsum(2)[:, :height, :width]
    low = maps.flatten(1).min(1).values[:, None, None]
    high = maps.flatten(1).max(1).values[:, None, None]
    return torch.where(high > low, (maps - low) / (high - low).clamp(min=1e-12), torch.zeros_like(maps))


def otsu_threshold(values, bins=64):
    """The threshold in (0, 1) that maximises the between-class variance of ``values`` (in [0, 1])."""
    hist = np.histogram(values, bins=bins, range=(0.0, 1.0))[0].astype(np.float64)
    if hist.sum() == 0:
        return 0.5
    prob = hist / hist.sum()
    centres = (np.arange(bins) + 0.5) / bins
    w0 = np.cumsum(prob)[:-1]  # cells below the cut after bin i
    mu0 = np.cumsum(prob * centres)[:-1]
    mu_total = (prob * centres).sum()
    w1 = 1 - w0
    valid = (w0 > 0) & (w1 > 0)
    between = np.zeros_like(w0)
    between[valid] = (mu_total * w0[valid] - mu0[valid]) ** 2 / (w0[valid] * w1[valid])
    return float(np.argmax(between) + 1) / bins


def pseudo_boxes_from_map(likelihood, threshold, min_region_fraction, stride):
    """Boxes [N, 4] (XYXY pixels) of the connected regions of ``likelihood >= threshold``
    (8-connectivity); regions smaller than ``min_region_fraction`` of the largest are dropped.
    ``threshold`` None: the adaptive (Otsu) threshold over the cells that received votes."""
    values = likelihood.detach().float().cpu().numpy()
    if values.max() <= 0:
        return np.zeros((0, 4), dtype=np.float32)
    if threshold is None:
        threshold = otsu_threshold(values[values > 0])
    mask = (values >= threshold).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    stats = stats[1:]  # row 0 is the background
    if len(stats) == 0:
        return np.zeros((0, 4), dtype=np.float32)
    areas = stats[:, cv2.CC_STAT_AREA]
    keep = stats[areas >= min_region_fraction * areas.max()]
    x, y = keep[:, cv2.CC_STAT_LEFT], keep[:, cv2.CC_STAT_TOP]
    w, h = keep[:, cv2.CC_STAT_WIDTH], keep[:, cv2.CC_STAT_HEIGHT]
    return (np.stack([x, y, x + w, y + h], axis=1) * stride).astype(np.float32)


def slv_pseudo_boxes(boxes, scores, labels, image_size, cfg_slv):
    """Pseudo ground truth of one image: (boxes [N, 4], classes [N]) and the likelihood maps
    [len(labels), H, W] on the map grid (for the SD loss).

    boxes: proposals [R, 4]; scores: [R, C] foreground scores (detached); labels: image classes.
    ``image_size``: (h, w) of the padded input the maps cover.
    """
    stride = cfg_slv.MAP_STRIDE
    grid = (-(-image_size[0] // stride), -(-image_size[1] // stride))
    maps = vote_maps(boxes, scores[:, labels], grid, stride, cfg_slv.VOTE_SCORE_THRESH)
    threshold = cfg_slv.THRESHOLD if cfg_slv.PSEUDO_BOXES == "threshold" else None
    out_boxes, out_classes = [], []
    for cls, likelihood in zip(labels.tolist(), maps):
        found = pseudo_boxes_from_map(likelihood, threshold, cfg_slv.MIN_REGION_FRACTION, stride)
        out_boxes.append(found)
        out_classes += [cls] * len(found)
    found = np.concatenate(out_boxes) if out_boxes else np.zeros((0, 4), dtype=np.float32)
    device = boxes.device
    return (torch.as_tensor(found, device=device).reshape(-1, 4),
            torch.as_tensor(out_classes, dtype=torch.long, device=device), maps)
