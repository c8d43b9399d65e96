"""``MILROIHeads``: the multiple-instance ROI head of weakly supervised detection.

On the pooled features of every precomputed proposal (stock ``ROIPooler`` and box head):

* WSDDN (Bilen & Vedaldi 2016): a classification stream softmaxed over classes times a detection
  stream softmaxed over proposals gives x_{r,c}; the image score phi_c = sum_r x_{r,c} is trained
  with binary cross-entropy against the image's class tags (summed over classes, as in the paper).
* OICR (Tang et al. 2017): K refinement classifiers over C + 1 classes (background last, as in
  Detectron2). Branch k's targets come from branch k-1's scores (branch 1's from WSDDN's x): per
  image class c, the top proposal j_c not taken by an earlier class is a seed; each proposal takes
  the class of its best-overlapping seed when IoU >= REFINE_IOU, background otherwise, weighted by
  that seed's score.
* SLV (optional): the refinement scores vote into likelihood maps (``slv``); the maps' pseudo
  boxes train a stock Fast R-CNN predictor (re-classification + box regression). With
  ``PSEUDO_BOXES "top_proposal"`` the same predictor trains on OICR's own seeds instead (each
  image class's top proposal of the refinements' mean): SLV's regression branch without SLV.
* SD (optional): the maps supervise the backbone's spatial attention (``self_distill``).

Inference: the SLV predictor's classes and regressed boxes (per-class NMS), or the mean of the K
refinement branches on the proposal boxes.
"""
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, build_box_head
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference
from detectron2.structures import Boxes, Instances, pairwise_iou

from .self_distill import sd_loss
from .slv import slv_pseudo_boxes


def wsddn_image_loss(cls_logits, det_logits, labels, num_classes):
    """BCE of phi_c = sum_r softmax_c(cls)_{r,c} * softmax_r(det)_{r,c} against the tags of one
    image; returns (loss summed over classes, x [R, C])."""
    x = F.softmax(cls_logits, dim=1) * F.softmax(det_logits, dim=0)
    phi = x.sum(0).clamp(1e-6, 1 - 1e-6)
    y = torch.zeros(num_classes, device=x.device, dtype=x.dtype)
    y[labels] = 1.0
    # written out rather than F.binary_cross_entropy, which raises on a NaN input: a diverging run
    # must reach the trainer's non-finite-loss stop, which names the loss term and the iteration
    return -(y * phi.log() + (1 - y) * (1 - phi).log()).sum(), x


def seed_proposals(scores, labels):
    """j_c for each image class c, in the order of ``labels``: its top-scoring proposal among those
    no earlier class took. As OICR's ``_get_highest_score_proposals`` (``cls_prob[max_index, :] =
    0`` after each pick), a chosen proposal is masked for the classes after it, so two classes
    sharing a top proposal do not both seed it (the second one would get no positive). The mask is
    -1, below any probability, so even a 0-score proposal wins over a taken one."""
    scores = scores[:, labels].clone()
    seeds = []
    for c in range(len(labels)):
        seed = int(scores[:, c].argmax())
        seeds.append(seed)
        scores[seed] = -1.0
    return torch.tensor(seeds, dtype=torch.long, device=scores.device)


def refinement_targets(boxes, previous_scores, labels, iou_threshold, num_classes):
    """OICR targets of one image: (class per proposal [R], weight per proposal [R]).

    previous_scores: [R, C] foreground scores of the previous branch (detached). An image without
    class tags makes every proposal background with weight 1.
    """
    num = len(boxes)
    if len(labels) == 0:
        return (torch.full((num,), num_classes, dtype=torch.long, device=boxes.device),
                torch.ones(num, device=boxes.device))
    seeds = seed_proposals(previous_scores, labels)
    seed_scores = previous_scores[seeds, labels]
    iou = pairwise_iou(Boxes(boxes), Boxes(boxes[seeds]))  # [R, classes]
    best_iou, best = iou.max(1)
    classes = torch.where(best_iou >= iou_threshold, labels[best], torch.full_like(best, num_classes))
    return classes, seed_scores[best]


@ROI_HEADS_REGISTRY.register()
class MILROIHeads(nn.Module):
    def __init__(self, cfg, input_shape):
        super().__init__()
        head = cfg.MODEL.ROI_HEADS
        self.in_features = list(head.IN_FEATURES)
        self.num_classes = head.NUM_CLASSES
        self.wsod = cfg.MODEL.WSOD
        resolution = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        self.pooler = ROIPooler(
            output_size=resolution,
            scales=tuple(1.0 / input_shape[k].stride for k in self.in_features),
            sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
            pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
        )
        channels = {input_shape[k].channels for k in self.in_features}
        if len(channels) != 1:
            raise ValueError(f"MODEL.ROI_HEADS.IN_FEATURES {self.in_features} have different channel counts")
        self.box_head = build_box_head(
            cfg, ShapeSpec(channels=channels.pop(), height=resolution, width=resolution))
        dim = self.box_head.output_shape.channels
        self.wsddn_cls = nn.Linear(dim, self.num_classes)
        self.wsddn_det = nn.Linear(dim, self.num_classes)
        self.refinements = nn.ModuleList(
            nn.Linear(dim, self.num_classes + 1) for _ in range(self.wsod.NUM_REFINEMENTS))
        for layer in [self.wsddn_cls, self.wsddn_det, *self.refinements]:
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        self.slv_predictor = None
        if self.wsod.SLV.ENABLED:
            self.slv_predictor = FastRCNNOutputLayers(cfg, self.box_head.output_shape)
            self.pseudo_box_matcher = Matcher([self.wsod.REFINE_IOU], [0, 1], allow_low_quality_matches=False)
        self.sd_features = list(self.wsod.SD.IN_FEATURES) or self.in_features
        branch = self.wsod.TEST_BRANCH
        self.test_branch = ("slv" if self.slv_predictor is not None else "refinement") if branch == "auto" else branch
        self.score_thresh = head.SCORE_THRESH_TEST
        self.nms_thresh = head.NMS_THRESH_TEST
        self.detections_per_image = cfg.TEST.DETECTIONS_PER_IMAGE

    def box_features(self, features, proposals):
        pooled = self.pooler([features[f] for f in self.in_features], [p.proposal_boxes for p in proposals])
        return self.box_head(pooled)

    def forward(self, images, features, proposals, targets=None):
        """``targets`` (training): per image a LongTensor of its class tags."""
        box_features = self.box_features(features, proposals)
        if not self.training:
            return self.inference(box_features, proposals), {}
        per_image = [len(p) for p in proposals]
        return None, self.losses(images, features, proposals, targets, box_features, per_image)

    def losses(self, images, features, proposals, targets, box_features, per_image):
        cls_logits = self.wsddn_cls(box_features).split(per_image)
        det_logits = self.wsddn_det(box_features).split(per_image)
        logits = [r(box_features).split(per_image) for r in self.refinements]
        losses = {"loss_mil": 0.0, **{f"loss_refine{k + 1}": 0.0 for k in range(len(logits))}}
        slv_proposals, maps = [], []
        for i, (props, labels) in enumerate(zip(proposals, targets)):
            boxes = props.proposal_boxes.tensor
            loss, previous = wsddn_image_loss(cls_logits[i], det_logits[i], labels, self.num_classes)
            losses["loss_mil"] = losses["loss_mil"] + loss / len(proposals)
            probs = []
            for k, branch in enumerate(logits):
                classes, weights = refinement_targets(
                    boxes, previous.detach(), labels, self.wsod.REFINE_IOU, self.num_classes)
                ce = F.cross_entropy(branch[i], classes, reduction="none")
                losses[f"loss_refine{k + 1}"] = losses[f"loss_refine{k + 1}"] + (weights * ce).mean() / len(proposals)
                previous = F.softmax(branch[i], dim=1)[:, : self.num_classes]
                probs.append(previous)
            if self.slv_predictor is not None or self.wsod.SD.ENABLED:
                voting_scores = torch.stack(probs).mean(0).detach()  # the refinements' mean
                if self.wsod.SLV.PSEUDO_BOXES == "top_proposal":  # OICR's own seeds, no voting
                    pseudo_boxes, pseudo_classes = boxes[seed_proposals(voting_scores, labels)], labels
                else:
                    pseudo_boxes, pseudo_classes, class_maps = slv_pseudo_boxes(
                        boxes, voting_scores, labels, props.image_size, self.wsod.SLV)
                    maps.append(class_maps)
                slv_proposals.append(self.label_proposals(props, pseudo_boxes, pseudo_classes))
        if self.slv_predictor is not None:
            predictions = self.slv_predictor(box_features)
            slv = self.slv_predictor.losses(predictions, slv_proposals)
            w = self.wsod.SLV.LOSS_WEIGHT
            losses["loss_slv_cls"] = w * slv["loss_cls"]
            losses["loss_slv_box_reg"] = w * slv["loss_box_reg"]
        if self.wsod.SD.ENABLED:
            levels = [features[f] for f in self.sd_features]
            losses["loss_sd"] = self.wsod.SD.LOSS_WEIGHT * sd_loss(
                levels, maps, images.tensor.shape[-2:], self.wsod.SLV.MAP_STRIDE)
        return losses

    def label_proposals(self, proposals, pseudo_boxes, pseudo_classes):
        """Fast R-CNN targets of one image's proposals from its pseudo boxes (IoU >= REFINE_IOU:
        the box's class and regression target; otherwise background)."""
        out = Instances(proposals.image_size, proposal_boxes=proposals.proposal_boxes)
        num = len(proposals)
        if len(pseudo_boxes) == 0:
            out.gt_classes = torch.full((num,), self.num_classes, dtype=torch.long,
                                        device=pseudo_classes.device)
            out.gt_boxes = proposals.proposal_boxes.clone()
            return out
        quality = pairwise_iou(Boxes(pseudo_boxes), proposals.proposal_boxes)
        matched, matched_labels = self.pseudo_box_matcher(quality)
        classes = pseudo_classes[matched]
        classes[matched_labels == 0] = self.num_classes
        out.gt_classes = classes
        out.gt_boxes = Boxes(pseudo_boxes[matched])
        return out

    def inference(self, box_features, proposals):
        if self.test_branch == "slv":
            return self.slv_predictor.inference(self.slv_predictor(box_features), proposals)[0]
        refined = [F.softmax(r(box_features), dim=1) for r in self.refinements]
        scores = torch.stack(refined).mean(0).split([len(p) for p in proposals])
        boxes = [p.proposal_boxes.tensor for p in proposals]
        return fast_rcnn_inference(
            boxes, scores, [p.image_size for p in proposals], self.score_thresh, self.nms_thresh,
            self.detections_per_image)[0]
