"""MobileNetV3-Small (Howard et al. 2019): inverted residuals with hardswish and hard-sigmoid SE gates.

Channel coupling exercised:
- squeeze-excitation gate: global pool -> 1x1 reduce -> ReLU -> 1x1 expand -> Hardsigmoid -> ``x * gate``;
  the gate's output channel i multiplies feature channel i, so the expand conv's output is coupled to the
  depthwise conv it gates, while the reduce width is free;
- residual add where stride 1 and widths match;
- first block with expansion == input width (no expansion conv), depthwise 3x3 and 5x5 kernels;
- Hardswish and ReLU activations, a linear -> Hardswish -> dropout -> linear classifier.
"""

from __future__ import annotations

import torch
from torch import nn


def make_divisible(value: float, divisor: int = 8) -> int:
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x):
        scale = self.fc2(self.relu(self.fc1(self.avgpool(x))))
        return x * self.scale_activation(scale)


class ConvBNAct(nn.Sequential):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, activation=nn.Hardswish):
        layers = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class InvertedResidualSE(nn.Module):
    def __init__(self, in_channels, kernel, expanded, out_channels, use_se, activation, stride):
        super().__init__()
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(ConvBNAct(in_channels, expanded, 1, activation=activation))
        layers.append(ConvBNAct(expanded, expanded, kernel, stride, groups=expanded, activation=activation))
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4)))
        layers.append(ConvBNAct(expanded, out_channels, 1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        result = self.block(x)
        if self.use_residual:
            result = result + x
        return result


RE, HS = nn.ReLU, nn.Hardswish
# kernel, expanded, out, SE, activation, stride (MobileNetV3-Small minus 3 of its 11 blocks)
SMALL_CONFIG = (
    (3, 16, 16, True, RE, 2),
    (3, 72, 24, False, RE, 2),
    (3, 88, 24, False, RE, 1),
    (5, 96, 40, True, HS, 2),
    (5, 240, 40, True, HS, 1),
    (5, 120, 48, True, HS, 1),
    (5, 288, 96, True, HS, 2),
    (5, 576, 96, True, HS, 1),
)


class MobileNetV3Small(nn.Module):
    def __init__(self, width_multiplier: float, stem_stride: int, first_block_stride: int, last_channel: int,
                 num_classes: int):
        super().__init__()
        stem_width = make_divisible(16 * width_multiplier)
        layers: list[nn.Module] = [ConvBNAct(3, stem_width, 3, stem_stride, activation=HS)]
        in_channels = stem_width
        for index, (kernel, expanded, out, use_se, activation, stride) in enumerate(SMALL_CONFIG):
            if index == 0:
                stride = first_block_stride
            expanded = make_divisible(expanded * width_multiplier)
            out = make_divisible(out * width_multiplier)
            layers.append(InvertedResidualSE(in_channels, kernel, expanded, out, use_se, activation, stride))
            in_channels = out
        last_conv = 6 * in_channels
        layers.append(ConvBNAct(in_channels, last_conv, 1, activation=HS))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=0.2, inplace=True),
            nn.Linear(last_channel, num_classes),
        )

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v3_small_cifar(num_classes: int = 10) -> nn.Module:
    """Width 0.75, stride-1 stem and first block (32 -> 32 -> 16 -> 8 -> 4), 256-wide hidden linear."""
    return MobileNetV3Small(0.75, stem_stride=1, first_block_stride=1, last_channel=256, num_classes=num_classes)


def mobilenet_v3_small_tiny_imagenet(num_classes: int = 1000) -> nn.Module:
    """Width 0.5, stride-2 3x3 stem, 256-wide hidden linear."""
    return MobileNetV3Small(0.5, stem_stride=2, first_block_stride=2, last_channel=256, num_classes=num_classes)
