"""EfficientNet-B0-style (Tan & Le 2019): MBConv blocks with SiLU and sigmoid squeeze-excitation.

Channel coupling exercised:
- SE gate computed functionally: pool -> 1x1 reduce (width from the *block input*, not the expanded
  width) -> SiLU -> 1x1 expand -> ``torch.sigmoid`` -> ``x * gate``;
- residual add between projection outputs of repeated blocks (stochastic depth omitted: identity in eval);
- depthwise 3x3 and 5x5 convs, SiLU everywhere, dropout before the final linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_divisible(value: float, divisor: int = 8) -> int:
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.conv_expand(F.silu(self.conv_reduce(s)))
        return x * torch.sigmoid(s)


class MBConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand_ratio: int,
                 se_ratio: float = 0.25):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self.expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self.bn0 = nn.BatchNorm2d(hidden)
        self.depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.se = SqueezeExcite(hidden, max(1, int(in_channels * se_ratio)))
        self.project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act = nn.SiLU(inplace=True)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, inputs):
        x = inputs
        if self.has_expansion:
            x = self.act(self.bn0(self.expand_conv(x)))
        x = self.act(self.bn1(self.depthwise_conv(x)))
        x = self.se(x)
        x = self.bn2(self.project_conv(x))
        if self.use_residual:
            x = x + inputs
        return x


# expand ratio, kernel, stride, width, repeats (B0 with repeats cut from 1,2,2,3,3,4,1)
B0_BLOCKS = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 2), (6, 5, 1, 112, 1),
             (6, 5, 2, 192, 2), (6, 3, 1, 320, 1))


class EfficientNet(nn.Module):
    def __init__(self, width_multiplier: float, stem_stride: int, strides_override: dict, head_width: int,
                 num_classes: int):
        super().__init__()
        stem_width = make_divisible(32 * width_multiplier)
        self.conv_stem = nn.Conv2d(3, stem_width, 3, stem_stride, 1, bias=False)
        self.bn_stem = nn.BatchNorm2d(stem_width)
        blocks = []
        in_channels = stem_width
        for index, (expand, kernel, stride, width, repeats) in enumerate(B0_BLOCKS):
            stride = strides_override.get(index, stride)
            out_channels = make_divisible(width * width_multiplier)
            for r in range(repeats):
                blocks.append(MBConv(in_channels, out_channels, kernel, stride if r == 0 else 1, expand))
                in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = nn.Conv2d(in_channels, head_width, 1, bias=False)
        self.bn_head = nn.BatchNorm2d(head_width)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(head_width, num_classes)

    def forward(self, x):
        x = F.silu(self.bn_stem(self.conv_stem(x)))
        x = self.blocks(x)
        x = F.silu(self.bn_head(self.conv_head(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(self.dropout(x))


def efficientnet_b0_cifar(num_classes: int = 10) -> nn.Module:
    """Width 0.5, stride-1 stem and no downsampling in the 24-wide stage (32 -> 16 -> 8 -> 4)."""
    return EfficientNet(0.5, stem_stride=1, strides_override={1: 1}, head_width=384, num_classes=num_classes)


def efficientnet_b0_tiny_imagenet(num_classes: int = 1000) -> nn.Module:
    """Width 0.25, stride-2 3x3 stem, 320-wide head."""
    return EfficientNet(0.25, stem_stride=2, strides_override={}, head_width=320, num_classes=num_classes)
