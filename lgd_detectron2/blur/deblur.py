"""Feature-level deblurring (the "deblurring subnet", DBS, of the reconstructed Cho et al. design;
spec: shared/specs/other-skd.md section 1, "Forward" step 2).

``DeblurFPN`` is Detectron2's FPN with one small residual block per output level applied after
the pyramid: ``forward(x) = deblur_features(forward_without_deblur(x))``. It is the backbone of the
deployed blur-robust detector (a plain ``GeneralizedRCNN`` with ``MODEL.BACKBONE.NAME
build_resnet_fpn_deblur_backbone``); in training, ``SelfGuidedBlurRCNN`` runs the sharp view
through ``forward_without_deblur`` only (the teacher side) and the blurred view through both.
Parameter names are the FPN's (``bottom_up.*``, ``fpn_lateral2.*``, ...) plus ``deblur.<level>.*``,
so a plain FPN checkpoint loads into it (the deblurring blocks start as the identity).

Block (ours where the spec is unverified): 1x1 reduce -> norm-ReLU -> 3x3 (deformable: its offsets
are predicted from the reduced map by a zero-initialised 3x3 conv, so it starts as a plain 3x3)
-> norm-ReLU -> 1x1 expand, added to the input. Deviation from the spec's sketch (learned 1x1
skip, final norm-ReLU): an identity skip and a zero-initialised expand make the block start as
the identity, so at the start of training the shared head sees the same kind of features on both
views, and a ReLU at the end would clip the signed FPN features.
"""
import torch
from torch import nn
from torchvision.ops import deform_conv2d

from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import build_resnet_backbone


class DeformableConv3x3(nn.Module):
    """3x3 deformable convolution (torchvision op, CPU and GPU) with offsets from a 3x3 conv of its
    input; the offset conv starts at zero, so the layer starts as a plain 3x3 convolution."""

    def __init__(self, channels):
        super().__init__()
        self.offset = nn.Conv2d(channels, 2 * 9, 3, padding=1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
        nn.init.kaiming_uniform_(self.weight, a=1)

    def forward(self, x):
        return deform_conv2d(x, self.offset(x), self.weight, padding=1)


class DeblurBlock(nn.Module):
    def __init__(self, channels, bottleneck, norm="BN", deformable=True):
        super().__init__()
        self.reduce = Conv2d(channels, bottleneck, 1, bias=not norm, norm=get_norm(norm, bottleneck))
        if deformable:
            self.spatial = DeformableConv3x3(bottleneck)
        else:
            self.spatial = nn.Conv2d(bottleneck, bottleneck, 3, padding=1, bias=False)
        self.spatial_norm = get_norm(norm, bottleneck) or nn.Identity()
        self.expand = nn.Conv2d(bottleneck, channels, 1)
        nn.init.zeros_(self.expand.weight)  # the block starts as the identity
        nn.init.zeros_(self.expand.bias)

    def forward(self, x):
        y = torch.relu(self.reduce(x))
        y = torch.relu(self.spatial_norm(self.spatial(y)))
        return x + self.expand(y)


class DeblurFPN(FPN):
    def __init__(self, *, deblur_levels=(), bottleneck=64, deblur_norm="BN", deformable=True, **fpn_kwargs):
        super().__init__(**fpn_kwargs)
        levels = list(deblur_levels) or list(self._out_features)
        unknown = [l for l in levels if l not in self._out_features]
        if unknown:
            raise ValueError(f"MODEL.DEBLUR.IN_FEATURES {unknown} are not FPN outputs {self._out_features}")
        self.deblur = nn.ModuleDict({
            l: DeblurBlock(self._out_feature_channels[l], bottleneck, deblur_norm, deformable)
            for l in levels
        })

    def forward_without_deblur(self, x):
        return super().forward(x)

    def deblur_features(self, features):
        return {l: self.deblur[l](f) if l in self.deblur else f for l, f in features.items()}

    def forward(self, x):
        return self.deblur_features(self.forward_without_deblur(x))


@BACKBONE_REGISTRY.register()
def build_resnet_fpn_deblur_backbone(cfg, input_shape: ShapeSpec):
    """``build_resnet_fpn_backbone`` with a deblurring block per level (``MODEL.DEBLUR``)."""
    d = cfg.MODEL.DEBLUR
    return DeblurFPN(
        bottom_up=build_resnet_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        deblur_levels=d.IN_FEATURES,
        bottleneck=d.BOTTLENECK_CHANNELS,
        deblur_norm=d.NORM,
        deformable=d.DEFORMABLE,
    )
