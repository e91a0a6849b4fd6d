"""MobileNetV1 (Howard et al. 2017): depthwise-separable convolutions.

Channel coupling exercised:
- depthwise 3x3 conv (groups == channels): its input and output channel i are the same channel, so the
  producer's channel groups pass straight through it, BN and ReLU included;
- pointwise 1x1 convs that start a new channel set after every depthwise conv;
- CIFAR: fixed 2x2 average pool -> view -> linear; ImageNet: adaptive pool -> flatten -> dropout -> linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (output width, stride) of each depthwise-separable block; the 5 x 512 middle of the real net is cut to 2.
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (1024, 2), (1024, 1))


class DepthwiseSeparable(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        x = F.relu(self.bn1(self.depthwise(x)))
        return F.relu(self.bn2(self.pointwise(x)))


class MobileNetV1(nn.Module):
    def __init__(self, width_multiplier: float, stem_stride: int, cifar_head: bool, num_classes: int):
        super().__init__()
        stem_width = int(32 * width_multiplier)
        self.conv1 = nn.Conv2d(3, stem_width, 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        layers = []
        in_channels = stem_width
        for width, stride in BLOCKS:
            out_channels = int(width * width_multiplier)
            layers.append(DepthwiseSeparable(in_channels, out_channels, stride))
            in_channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.cifar_head = cifar_head
        self.dropout = nn.Dropout(0.2)
        self.linear = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        if self.cifar_head:
            out = F.avg_pool2d(out, 2)  # the 2x2 map left at 32x32 input
            out = out.view(out.size(0), -1)
        else:
            out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
            out = self.dropout(out)
        return self.linear(out)


def mobilenet_v1_cifar(num_classes: int = 10) -> nn.Module:
    """Width 0.5 (16 -> 512 channels), stride-1 stem."""
    return MobileNetV1(0.5, stem_stride=1, cifar_head=True, num_classes=num_classes)


def mobilenet_v1_tiny_imagenet(num_classes: int = 1000) -> nn.Module:
    """Width 0.25 (8 -> 256 channels), stride-2 3x3 stem, dropout before the classifier."""
    return MobileNetV1(0.25, stem_stride=2, cifar_head=False, num_classes=num_classes)
