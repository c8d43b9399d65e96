"""``WeaklySupervisedRCNN``: Detectron2's GeneralizedRCNN trained from image-level labels.

Stock backbone (ResNet C4 or FPN), precomputed proposals (``MODEL.LOAD_PROPOSALS``), and an ROI
head that takes per-image class tags instead of instances (``MILROIHeads``). Inference is the
stock GeneralizedRCNN path (detections rescaled to the original image size).
"""
import torch

from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN


@META_ARCH_REGISTRY.register()
class WeaklySupervisedRCNN(GeneralizedRCNN):
    def forward(self, batched_inputs):
        if not self.training:
            return self.inference(batched_inputs)
        for x in batched_inputs:
            if "instances" in x or "image_labels" not in x:
                raise ValueError(
                    f"WeaklySupervisedRCNN trains on image-level labels only; image "
                    f"{x.get('image_id')} ({x.get('file_name')}) has "
                    f"{'boxes' if 'instances' in x else 'no image_labels'}: train on '<dataset>_weak'"
                )
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        proposals = [x["proposals"].to(self.device) for x in batched_inputs]
        labels = [torch.as_tensor(x["image_labels"], dtype=torch.long, device=self.device)
                  for x in batched_inputs]
        _, losses = self.roi_heads(images, features, proposals, labels)
        return losses
