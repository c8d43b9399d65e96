"""LGD's label-guided self-teacher (Zhang et al., "LGD: Label-guided Self-distillation for Object
Detection", AAAI 2022), vectorised over all objects of a batch.

Words: B images, T objects in the batch (all images together, plus one context object per image
when enabled), C FPN channels, K classes, levels l with maps of H_l x W_l cells and stride s_l.

Data flow (spec: shared/specs/lgd.md section 2):
  GT boxes + classes --descriptor--> label encoder (PointNet, 2 T-Nets, per-image max-pool) -> E'
  student FPN S_l --conv+norm--> masked average pooling over each object's cells -> A_l
  relation attention: Q = A_l, K = V = E', objects see only their own image -> O_l
  knowledge mapper: paint Linear(O_l) into object cells, conv, (+ context vector), ReLU,
  refinement convs -> T_l, same shape as S_l.

Deviations from the original code (each tested):
  * boxes are normalised by each image's own size, not by the padded batch tensor;
  * cell (i, j) is inside a box if its centre ((j + 0.5) s, (i + 0.5) s) is, and every object also
    covers the cell holding its box centre, so no object has zero cells on any level;
  * zero-width and out-of-image boxes are clamped to the image and keep their centre cell;
  * images without objects simply contribute no rows (no dummy object); with ADD_CONTEXT_BOX every
    image gets its context object, with or without GT;
  * masks, pooling, painting and attention are tensor ops over the whole batch (no Python loop
    over objects or images); channels, levels and strides come from backbone.output_shape();
  * a module that the chosen interaction pattern does not use is not built (the original builds
    the attention and the label encoder for every pattern and computes them).

Interaction patterns (the original's INTERACT_PATTERN, spec section 2.3), per level l:
  "stuGuided" (default): O_l = Attention(Q = A_l, K = V = E')
  "labelGuided":         O_l = Attention(Q = E', K = V = A_l)
  "teacher_fill":        O_l = E'   (no attention, no appearance)
  "student_fill":        O_l = A_l  (no attention, no label encoder: the labels' boxes only)

Class identity (ours; the original has only "attention"): how an object's own class reaches its
painted cells.
  "attention": only through O_l. With "stuGuided" an object's vector is a mix of the label
               embeddings of its image, weighted by how its appearance matches them; if the
               attention does not single out the object's own label, every object of an image gets
               a similar mixture and the maps say where objects are, not what they are.
  "residual":  O_l + E'_t, object t's own label embedding added to its attention output.
  "class_channels": as LabelEnc (Hao et al., ECCV 2020): K more painted channels, object t's box
               painted with 1 in the channel of its class, concatenated to the painted object
               vectors before the painted-map convolution. The class reaches the map whatever
               the attention does, and objects of different classes that overlap keep both.

Region masks (ours; the original has only "cell_centres"): which cells an object's vector is
painted into and its appearance pooled from, per level.
  "cell_centres": cell (i, j) is in the box if its centre is (binary masks). A box edge is known
               only to the nearest cell, s_l pixels (4 px on P2), whatever the box's true edge.
  "coverage":  each cell weighted by the fraction of its area inside the box (1 inside, between 0
               and 1 on the edges): the painted map keeps each edge to sub-cell precision, and the
               appearance A_l is the coverage-weighted average. Sides under 1 px count as 1 px,
               so every object covers some cell.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["LabelEncoder", "SelfTeacher", "ObjectTable", "build_object_table", "cell_masks",
           "coverage_masks", "INTERACT_PATTERNS", "CLASS_IDENTITIES", "REGION_MASKS"]

INTERACT_PATTERNS = ("stuGuided", "labelGuided", "teacher_fill", "student_fill")
CLASS_IDENTITIES = ("attention", "residual", "class_channels")
REGION_MASKS = ("cell_centres", "coverage")


def _mlp(in_dim, out_dim):
    """Per-object 'conv1d k=1' of the original: Linear -> LayerNorm(no affine) -> ReLU."""
    return nn.Sequential(
        nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim, elementwise_affine=False), nn.ReLU()
    )


class TNet(nn.Module):
    """PointNet transform net; predicts a k x k matrix per object (one point per object, so its
    max over points is the identity and it is a per-object MLP). As in the original: no identity
    initialisation and no orthogonality regulariser."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.net = nn.Sequential(
            _mlp(k, 64), _mlp(64, 128), _mlp(128, 1024), _mlp(1024, 512), _mlp(512, 256),
            nn.Linear(256, k * k),
        )

    def forward(self, x):
        return self.net(x).view(-1, self.k, self.k)


class LabelEncoder(nn.Module):
    """PointNet-style encoder of object descriptors -> C-dim label embeddings (spec 2.1)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.input_transform = TNet(in_dim)
        self.embed_local = _mlp(in_dim, 64)
        self.feature_transform = TNet(64)
        self.embed_global = nn.Sequential(_mlp(64, 128), _mlp(128, 1024))
        self.fuse = _mlp(64 + 1024, out_dim)

    def forward(self, descriptors, batch_idx, num_images):
        x = torch.bmm(descriptors.unsqueeze(1), self.input_transform(descriptors)).squeeze(1)
        x = self.embed_local(x)
        local = torch.bmm(x.unsqueeze(1), self.feature_transform(x)).squeeze(1)  # f_loc (T, 64)
        g = self.embed_global(local)  # (T, 1024)
        # per-image max-pool, broadcast back to the image's objects (f_glob)
        index = batch_idx[:, None].expand_as(g)
        pooled = g.new_zeros(num_images, g.shape[1]).scatter_reduce(
            0, index, g, reduce="amax", include_self=False
        )
        return self.fuse(torch.cat([local, pooled[batch_idx]], dim=1))


class ObjectTable:
    """All objects of a batch as flat tensors: boxes (T, 4) xyxy clamped to their image,
    classes (T,) with -1 for context objects, batch_idx (T,), is_context (T,) bool."""

    def __init__(self, boxes, classes, batch_idx, is_context, image_sizes):
        self.boxes, self.classes, self.batch_idx = boxes, classes, batch_idx
        self.is_context, self.image_sizes = is_context, image_sizes  # image_sizes (B, 2) = (h, w)

    def __len__(self):
        return self.boxes.shape[0]


def build_object_table(gt_instances, image_sizes, add_context_box, device):
    boxes, classes, batch_idx, is_context = [], [], [], []
    for b, inst in enumerate(gt_instances):
        n = len(inst)
        if n:
            boxes.append(inst.gt_boxes.tensor.to(device=device, dtype=torch.float32))
            classes.append(inst.gt_classes.to(device))
            batch_idx.append(torch.full((n,), b, dtype=torch.long, device=device))
            is_context.append(torch.zeros(n, dtype=torch.bool, device=device))
        if add_context_box:
            h, w = image_sizes[b]
            boxes.append(torch.tensor([[0.0, 0.0, float(w), float(h)]], device=device))
            classes.append(torch.full((1,), -1, dtype=torch.long, device=device))
            batch_idx.append(torch.full((1,), b, dtype=torch.long, device=device))
            is_context.append(torch.ones(1, dtype=torch.bool, device=device))
    sizes = torch.tensor([list(s) for s in image_sizes], dtype=torch.float32, device=device)
    if not boxes:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return ObjectTable(torch.zeros(0, 4, device=device), empty, empty, empty.bool(), sizes)
    boxes, batch_idx = torch.cat(boxes), torch.cat(batch_idx)
    # clamp to the image (boxes partly or wholly outside end up on its border)
    hw = sizes[batch_idx]
    boxes = torch.minimum(boxes.clamp(min=0), torch.stack([hw[:, 1], hw[:, 0]] * 2, dim=1))
    # inverted boxes become zero-width at their first corner
    boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2])], dim=1)
    return ObjectTable(boxes, torch.cat(classes), batch_idx, torch.cat(is_context), sizes)


def object_descriptors(table: ObjectTable, num_classes):
    """[x1/w, y1/h, x2/w, y2/h, one-hot(K)] rescaled to [-1, 1]; context rows have no class."""
    hw = table.image_sizes[table.batch_idx]
    scale = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=1).clamp(min=1)
    box = table.boxes / scale
    onehot = F.one_hot(table.classes.clamp(min=0), num_classes).to(box.dtype)
    onehot = onehot * (table.classes >= 0).to(box.dtype)[:, None]
    return torch.cat([box, onehot], dim=1) * 2 - 1


def cell_masks(table: ObjectTable, height, width, stride):
    """Boolean (T, height, width) masks of the cells each object covers on a level of ``stride``.

    A cell is covered if its centre lies in the box (closed interval); the cell containing the
    box centre is always covered, so every object has at least one cell.
    """
    device = table.boxes.device
    cx = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    cy = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    x1, y1, x2, y2 = table.boxes.unbind(1)
    in_x = (cx[None] >= x1[:, None]) & (cx[None] <= x2[:, None])
    in_y = (cy[None] >= y1[:, None]) & (cy[None] <= y2[:, None])
    mask = in_y[:, :, None] & in_x[:, None, :]
    jc = torch.div((x1 + x2) / 2, stride, rounding_mode="floor").long().clamp(0, width - 1)
    ic = torch.div((y1 + y2) / 2, stride, rounding_mode="floor").long().clamp(0, height - 1)
    mask[torch.arange(len(table), device=device), ic, jc] = True
    return mask


def coverage_masks(table: ObjectTable, height, width, stride):
    """Float (T, height, width) masks: the fraction of each cell's area inside each box.

    Cell (i, j) spans [j s, (j + 1) s] x [i s, (i + 1) s]; its coverage is the product of the box's
    overlap with the column and with the row, each divided by s. A side shorter than 1 px is
    widened to 1 px about its centre (moved inside the image at its left or top edge).
    """
    device = table.boxes.device
    x1, y1, x2, y2 = table.boxes.unbind(1)

    def overlap(lo, hi, n):
        size = (hi - lo).clamp(min=1.0)
        lo = ((lo + hi) / 2 - size / 2).clamp(min=0.0)  # boxes are inside the image: lo >= 0 already
        hi = lo + size
        edges = torch.arange(n + 1, device=device, dtype=torch.float32) * stride
        return (torch.minimum(hi[:, None], edges[None, 1:]) - torch.maximum(lo[:, None], edges[None, :-1])
                ).clamp(min=0) / stride  # (T, n)

    return overlap(y1, y2, height)[:, :, None] * overlap(x1, x2, width)[:, None, :]


def region_masks(kind, table: ObjectTable, height, width, stride):
    """The masks of ``kind`` (one of REGION_MASKS)."""
    return (cell_masks if kind == "cell_centres" else coverage_masks)(table, height, width, stride)


def _block_masks(masks, batch_idx, num_images, dtype=torch.float32):
    """(T, H, W) masks -> (T, B*H*W) matrix whose row t is non-zero only on its image."""
    t = masks.shape[0]
    block = masks.new_zeros((t, num_images, masks.shape[1] * masks.shape[2]), dtype=dtype)
    block[torch.arange(t, device=masks.device), batch_idx] = masks.flatten(1).to(dtype)
    return block.flatten(1)


def _conv_norm(channels, relu=True):
    """Conv3x3 -> GroupNorm(1 group, no affine), optionally ReLU (the original's refinement)."""
    layers = [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(1, channels, affine=False)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class SelfTeacher(nn.Module):
    """Builds the instructive-knowledge maps T_l from GT labels and student FPN features S_l."""

    def __init__(self, *, channels, strides: Dict[str, int], num_classes, num_heads=8,
                 add_context_box=False, detach_appearance=True, recompute_in_backward=False,
                 interact_pattern="stuGuided", class_identity="attention", region_mask="cell_centres"):
        super().__init__()
        if interact_pattern not in INTERACT_PATTERNS:
            raise ValueError(f"interact_pattern {interact_pattern!r}; use one of {INTERACT_PATTERNS}")
        if class_identity not in CLASS_IDENTITIES:
            raise ValueError(f"class_identity {class_identity!r}; use one of {CLASS_IDENTITIES}")
        if region_mask not in REGION_MASKS:
            raise ValueError(f"region_mask {region_mask!r}; use one of {REGION_MASKS}")
        if class_identity == "residual" and interact_pattern == "student_fill":
            raise ValueError("class_identity 'residual' adds label embeddings, which the "
                             "'student_fill' pattern does not compute")
        self.recompute_in_backward = recompute_in_backward
        self.strides = dict(strides)
        self.num_classes = num_classes
        self.add_context_box = add_context_box
        self.detach_appearance = detach_appearance
        self.interact_pattern = interact_pattern
        self.class_identity = class_identity
        self.region_mask = region_mask
        self.uses_labels = interact_pattern != "student_fill"
        self.uses_appearance = interact_pattern != "teacher_fill"
        if self.uses_labels:  # label encoder + its projection (E -> E')
            self.label_encoder = LabelEncoder(4 + num_classes, channels)
            self.label_proj = nn.Sequential(
                nn.Linear(channels, channels), nn.LayerNorm(channels, elementwise_affine=False), nn.ReLU()
            )
        if self.uses_appearance:  # appearance encoder (shared over levels)
            self.appearance_proj = _conv_norm(channels)
        if interact_pattern in ("stuGuided", "labelGuided"):  # relation adapter (one layer, shared)
            self.relation = nn.MultiheadAttention(channels, num_heads)
        # intra-object knowledge mapper (shared over levels)
        self.object_proj = nn.Linear(channels, channels)
        self.context_proj = nn.Linear(channels, channels) if add_context_box else None
        class_channels = num_classes if class_identity == "class_channels" else 0
        self.painted_conv = nn.Conv2d(channels + class_channels, channels, 3, padding=1)
        self.refine = nn.Sequential(_conv_norm(channels), _conv_norm(channels), _conv_norm(channels, relu=False))

    def forward(self, features: Dict[str, torch.Tensor], gt_instances, image_sizes):
        levels = list(self.strides)
        ref = features[levels[0]]
        num_images, device = ref.shape[0], ref.device
        table = build_object_table(gt_instances, image_sizes, self.add_context_box, device)

        masks, blocks = self._masks(table, features, num_images)

        if len(table) == 0:
            # Nothing to encode or paint; every parameter still takes part in the graph with a
            # zero gradient (DDP needs that).
            keep_in_graph = 0.0 * sum(p.reshape(-1)[0] for p in self.parameters())
            objects = {l: None for l in levels}
        else:
            objects, _ = self.object_vectors(features, table, blocks)
            keep_in_graph = 0.0

        return {
            l: self._render(objects[l], blocks[l], table, features[l].shape, keep_in_graph, masks[l])
            for l in levels
        }

    def _masks(self, table, features, num_images):
        """Per level: the region masks (T, H, W) and their block matrix (T, B*H*W)."""
        masks = {l: region_masks(self.region_mask, table, *features[l].shape[-2:], s)
                 for l, s in self.strides.items()}
        return masks, {l: _block_masks(m, table.batch_idx, num_images) for l, m in masks.items()}

    def object_vectors(self, features, table, blocks, need_weights=False):
        """O_l (T, C) per level from the interaction pattern (and the class identity's residual);
        with ``need_weights`` also the attention weights per level (T, T), averaged over heads
        (None for the patterns without attention)."""
        levels = list(self.strides)
        num_images = features[levels[0]].shape[0]
        label_embed = None
        if self.uses_labels:
            desc = object_descriptors(table, self.num_classes)
            label_embed = self.label_proj(self.label_encoder(desc, table.batch_idx, num_images))
        appearance = None
        if self.uses_appearance:
            # appearance embeddings A_l: masked average of projected student features
            pooled = []
            for l in levels:
                s = features[l].detach() if self.detach_appearance else features[l]
                a = self.appearance_proj(s)  # (B, C, H, W)
                flat = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])  # (B*H*W, C)
                count = blocks[l].sum(1, keepdim=True).clamp(min=1e-6)  # every object covers some cell
                pooled.append(blocks[l] @ flat / count)
            appearance = torch.stack(pooled, dim=1)  # (T, L, C): one attention "batch" column per level
        weights = None
        if self.interact_pattern in ("stuGuided", "labelGuided"):
            labels = label_embed[:, None].expand_as(appearance)
            query, kv = (appearance, labels) if self.interact_pattern == "stuGuided" else (labels, appearance)
            other_image = table.batch_idx[:, None] != table.batch_idx[None, :]
            out, weights = self.relation(query, kv, kv, attn_mask=other_image, need_weights=need_weights)
        elif self.interact_pattern == "teacher_fill":
            out = label_embed[:, None].expand(-1, len(levels), -1)
        else:  # student_fill
            out = appearance
        if self.class_identity == "residual":
            out = out + label_embed[:, None]
        objects = {l: out[:, i] for i, l in enumerate(levels)}
        if weights is None:
            return objects, {l: None for l in levels}
        return objects, {l: weights[i] for i, l in enumerate(levels)}  # weights: (L, T, T)

    @torch.no_grad()
    def own_label_attention(self, features, gt_instances, image_sizes):
        """Diagnostic: per level, the attention weight each real object puts on its own label
        (the diagonal of the head-averaged weights) and 1 / N_b, N_b the number of labels it can
        attend to (the objects of its image, context object included). Only "stuGuided", where
        the keys are the labels. Returns {level: (own (T_real,), uniform (T_real,))}."""
        if self.interact_pattern != "stuGuided":
            raise ValueError("own-label attention is defined for the 'stuGuided' pattern (keys = labels)")
        levels = list(self.strides)
        num_images = features[levels[0]].shape[0]
        table = build_object_table(gt_instances, image_sizes, self.add_context_box, features[levels[0]].device)
        masks, blocks = self._masks(table, features, num_images)
        _, weights = self.object_vectors(features, table, blocks, need_weights=True)
        real = ~table.is_context
        per_image = torch.bincount(table.batch_idx, minlength=num_images).float()
        uniform = 1.0 / per_image[table.batch_idx]
        return {l: (w.diagonal()[real], uniform[real]) for l, w in weights.items()}

    def _render(self, objects, block, table, shape, keep_in_graph, masks):
        """Knowledge mapper: paint object vectors into their cells (overlaps sum), conv, context."""
        b, c, h, w = shape
        context = None
        if objects is None:
            x = self.painted_conv(block.new_zeros(b, self.painted_conv.in_channels, h, w))
        else:
            real = (~table.is_context)[:, None].to(objects.dtype)
            vec = self.object_proj(objects) * real
            if self.class_identity == "class_channels":
                onehot = F.one_hot(table.classes.clamp(min=0), self.num_classes).to(vec.dtype)
                vec = torch.cat([vec, onehot * real], dim=1)
            x = conv3x3_of_painted(self.painted_conv, masks, block, table.batch_idx, vec, b)
            if self.context_proj is not None:
                ctx = table.is_context
                context = x.new_zeros(b, c).index_add(
                    0, table.batch_idx[ctx], self.context_proj(objects[ctx])
                )
        if context is not None:
            x = x + context[:, :, None, None]
        x = F.relu(x)
        if self.recompute_in_backward and torch.is_grad_enabled():
            # GroupNorm has no running statistics: the recomputation is exact
            return checkpoint(self.refine, x, use_reentrant=False) + keep_in_graph
        return self.refine(x) + keep_in_graph


def conv3x3_of_painted(conv, masks, block, batch_idx, vectors, num_images):
    """``conv(P)`` for the painted map P = sum_t mask_t (x) v_t (object t's vector v_t in each of
    its cells; ``block``: the masks as ``_block_masks`` gives them), without materialising P or
    convolving it.

    A 3x3 convolution (zero padding 1) of P is, per kernel tap (a, b),
    sum_t shift_ab(mask_t) (x) (W_ab v_t): 9 projections of the T object vectors and one product of
    the (9T, B*H*W) shifted-mask matrix with them, about T/C of the convolution's arithmetic
    (forward and backward; same result up to float rounding). With as many objects as channels
    or more, the plain convolution is cheaper and is used.
    """
    t, h, w = masks.shape
    c_out, c_in = conv.weight.shape[:2]
    if t >= c_in or conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1):
        painted = (block.t().to(vectors.dtype) @ vectors).view(num_images, h, w, c_in).permute(0, 3, 1, 2)
        return conv(painted)
    # shift_ab(mask)(i, j) = mask(i + a - 1, j + b - 1), zero outside the map
    padded = F.pad(masks, (1, 1, 1, 1))
    shifted = torch.cat([padded[:, a:a + h, b:b + w] for a in range(3) for b in range(3)])
    shifted_block = _block_masks(shifted, batch_idx.repeat(9), num_images, vectors.dtype)  # (9T, B*H*W), tap-major
    # taps[k * T + t] = W_k v_t for tap k = 3a + b
    taps = torch.einsum("oik,ti->kto", conv.weight.flatten(2), vectors).reshape(9 * t, c_out)
    out = shifted_block.t() @ taps
    if conv.bias is not None:
        out = out + conv.bias
    return out.view(num_images, h, w, c_out).permute(0, 3, 1, 2)
