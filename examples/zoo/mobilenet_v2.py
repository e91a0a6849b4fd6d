"""MobileNetV2 (Sandler et al. 2018): inverted residuals with linear bottlenecks and ReLU6.

Channel coupling exercised:
- residual add between narrow (linear, no activation) bottleneck outputs, chaining blocks of a stage;
- expansion 1x1 conv -> depthwise 3x3 -> projection 1x1: the expanded width is free per block, the
  depthwise conv passes channel groups through;
- blocks with expansion 1 that have no expansion conv (depthwise conv reads the stem directly);
- ReLU6 activations, dropout before the final linear, adaptive average pool.
"""

from __future__ import annotations

import torch
from torch import nn


def make_divisible(value: float, divisor: int = 8) -> int:
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class ConvBNReLU6(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_channels, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, settings, width_multiplier: float, stem_stride: int, last_channel: int, num_classes: int,
                 image_channels: int = 3):
        super().__init__()
        in_channels = make_divisible(32 * width_multiplier)
        features: list[nn.Module] = [ConvBNReLU6(image_channels, in_channels, stride=stem_stride)]
        for t, c, n, s in settings:
            out_channels = make_divisible(c * width_multiplier)
            for i in range(n):
                features.append(InvertedResidual(in_channels, out_channels, s if i == 0 else 1, expand_ratio=t))
                in_channels = out_channels
        features.append(ConvBNReLU6(in_channels, last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channel, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# expansion t, width c, repeats n, first stride s (repeats cut from the real 1,2,3,4,3,3,1)
IMAGENET_SETTINGS = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 2, 1), (6, 160, 2, 2), (6, 320, 1, 1)
)
# CIFAR: the first two downsamplings are removed (32 -> 32 -> 32 -> 16 -> 8 -> 8 -> 4)
CIFAR_SETTINGS = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 2, 1), (6, 160, 2, 2), (6, 320, 1, 1)
)


def mobilenet_v2_cifar(num_classes: int = 10) -> nn.Module:
    """Width 0.5, stride-1 stem, 512-wide last 1x1 conv."""
    return MobileNetV2(CIFAR_SETTINGS, 0.5, stem_stride=1, last_channel=512, num_classes=num_classes)


def mobilenet_v2_fashion(num_classes: int = 10) -> nn.Module:
    """The CIFAR variant for 1x28x28 images with a stride-2 stem (28 -> 14 -> 7 -> 4 -> 2): the search benchmark's
    depthwise network (issue 13). A stride-1 stem would make each training step 5x slower on a CPU."""
    return MobileNetV2(CIFAR_SETTINGS, 0.5, stem_stride=2, last_channel=512, num_classes=num_classes,
                       image_channels=1)


def mobilenet_v2_tiny_imagenet(num_classes: int = 1000) -> nn.Module:
    """Width 0.25 (channels rounded to multiples of 8), stride-2 stem, 320-wide last 1x1 conv."""
    return MobileNetV2(IMAGENET_SETTINGS, 0.25, stem_stride=2, last_channel=320, num_classes=num_classes)
