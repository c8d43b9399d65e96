"""``ImageTagClassifier``: classification pretraining of a detector body from image-level labels.

Weakly supervised detectors start from a classification-pretrained body (ImageNet for VOC; no
box is involved). This meta-architecture trains the bottom-up body of any stock backbone (the
``bottom_up`` of an FPN, or the ResNet itself) as a multi-label image classifier: its last feature
map, global-average-pooled, through one linear layer, with binary cross-entropy on the tags. Its
checkpoint's ``backbone.*`` weights load into a ``WeaklySupervisedRCNN`` of the same backbone
config through MODEL.WEIGHTS (the classifier layer is left out, the ROI head starts fresh).
"""
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling import META_ARCH_REGISTRY, build_backbone


@META_ARCH_REGISTRY.register()
class ImageTagClassifier(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.backbone = build_backbone(cfg)
        body = self.body
        self.feature = max(body.output_shape().items(), key=lambda kv: kv[1].stride)[0]
        self.num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        self.classifier = nn.Linear(body.output_shape()[self.feature].channels, self.num_classes)
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)

    @property
    def body(self):
        return getattr(self.backbone, "bottom_up", self.backbone)

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, batched_inputs):
        images = torch.stack([(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
                              for x in batched_inputs])
        logits = self.classifier(self.body(images)[self.feature].mean((2, 3)))
        if not self.training:
            return [{"class_scores": s} for s in logits.sigmoid()]
        targets = torch.zeros_like(logits)
        for i, x in enumerate(batched_inputs):
            targets[i, x["image_labels"]] = 1.0
        return {"loss_image_cls": F.binary_cross_entropy_with_logits(logits, targets)}
