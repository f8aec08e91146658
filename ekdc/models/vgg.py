"""VGG with BatchNorm for small images (Simonyan & Zisserman 2015; the CIFAR form KD papers use): plain
3x3 conv-BN-ReLU stacks, max-pooled between stages, global average pooling, one Linear. No residuals:
a family whose errors differ from the ResNets', which is what an ensemble of teachers wants."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._registry import register_model
from .layers import FeatureClassifier, conv_bn, init_weights

# convolutions a stage; stages are 64, 128, 256, 512, 512 channels wide
_DEPTHS = {8: (1, 1, 1, 1, 1), 11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2)}
_WIDTHS = (64, 128, 256, 512, 512)


class VGG(FeatureClassifier):
    def __init__(self, depth: int, num_classes: int):
        super().__init__()
        stages, c_in = [], 3
        for n, w in zip(_DEPTHS[depth], _WIDTHS):
            layers = []
            for _ in range(n):
                layers += [conv_bn(c_in, w, 3, 1), nn.ReLU(inplace=True)]
                c_in = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.num_features = c_in
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.stages) - 1 and min(x.shape[-2:]) > 1:  # 32 px ends at 2x2 before the pooling
                x = F.max_pool2d(x, 2)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


@register_model
def vgg8(num_classes: int = 10) -> VGG:
    return VGG(8, num_classes)


@register_model
def vgg11(num_classes: int = 10) -> VGG:
    return VGG(11, num_classes)


@register_model
def vgg13(num_classes: int = 10) -> VGG:
    return VGG(13, num_classes)
