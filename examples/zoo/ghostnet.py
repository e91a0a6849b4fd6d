"""GhostNet (Han et al. 2020): ghost modules = primary 1x1 conv + cheap depthwise op, concat, then slice.

Channel coupling exercised:
- ``torch.cat([x1, cheap(x1)], 1)[:, :oup]``: the cheap depthwise conv's output channel i belongs with
  primary channel i, and the trailing slice drops the last channel whenever ``oup`` is odd (one block here
  uses an odd expansion width, 35, so the slice is not a no-op);
- residual add, with a depthwise + pointwise conv shortcut where the width or stride changes;
- SE gate with a functional hard sigmoid ``F.relu6(x + 3) / 6``;
- stride-2 depthwise conv between the two ghost modules; a 1x1 conv head after global pooling, dropout,
  linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def hard_sigmoid(x):
    return F.relu6(x + 3.0) / 6.0


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x):
        x_se = self.conv_expand(self.act(self.conv_reduce(self.avg_pool(x))))
        return x * hard_sigmoid(x_se)


class GhostModule(nn.Module):
    def __init__(self, inp: int, oup: int, kernel_size: int = 1, ratio: int = 2, dw_size: int = 3, relu: bool = True):
        super().__init__()
        self.oup = oup
        init_channels = math.ceil(oup / ratio)
        new_channels = init_channels * (ratio - 1)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, init_channels, kernel_size, 1, kernel_size // 2, bias=False),
            nn.BatchNorm2d(init_channels),
            nn.ReLU(inplace=True) if relu else nn.Sequential(),
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_channels, new_channels, dw_size, 1, dw_size // 2, groups=init_channels, bias=False),
            nn.BatchNorm2d(new_channels),
            nn.ReLU(inplace=True) if relu else nn.Sequential(),
        )

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        return out[:, : self.oup, :, :]


class GhostBottleneck(nn.Module):
    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, dw_kernel_size: int = 3, stride: int = 1,
                 se_ratio: float = 0.0):
        super().__init__()
        self.stride = stride
        self.ghost1 = GhostModule(in_chs, mid_chs, relu=True)
        if stride > 1:
            self.conv_dw = nn.Conv2d(mid_chs, mid_chs, dw_kernel_size, stride, (dw_kernel_size - 1) // 2,
                                     groups=mid_chs, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid_chs)
        self.se = SqueezeExcite(mid_chs, max(4, int(mid_chs * se_ratio) // 4 * 4)) if se_ratio > 0 else None
        self.ghost2 = GhostModule(mid_chs, out_chs, relu=False)
        if in_chs == out_chs and stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, in_chs, dw_kernel_size, stride, (dw_kernel_size - 1) // 2, groups=in_chs, bias=False),
                nn.BatchNorm2d(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x):
        residual = x
        x = self.ghost1(x)
        if self.stride > 1:
            x = self.bn_dw(self.conv_dw(x))
        if self.se is not None:
            x = self.se(x)
        x = self.ghost2(x)
        return x + self.shortcut(residual)


# kernel, mid (expansion) width, out width, SE ratio, stride -- GhostNet 1.0x cut to 8 blocks and ~1/2 width.
GHOST_CONFIG = (
    (3, 8, 8, 0.0, 1),
    (3, 24, 12, 0.0, 2),
    (3, 35, 12, 0.0, 1),  # odd expansion: ghost1's concat has 36 channels, the slice keeps 35
    (5, 36, 20, 0.25, 2),
    (5, 60, 20, 0.25, 1),
    (3, 120, 40, 0.0, 2),
    (3, 240, 56, 0.25, 1),
    (5, 336, 80, 0.25, 2),
)


class GhostNet(nn.Module):
    def __init__(self, stem_stride: int, num_classes: int, head_width: int = 256, dropout: float = 0.2):
        super().__init__()
        stem_width = 8
        self.conv_stem = nn.Conv2d(3, stem_width, 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.act1 = nn.ReLU(inplace=True)
        blocks = []
        in_chs = stem_width
        for kernel, mid, out, se_ratio, stride in GHOST_CONFIG:
            blocks.append(GhostBottleneck(in_chs, mid, out, kernel, stride, se_ratio))
            in_chs = out
        self.blocks = nn.Sequential(*blocks)
        last = 6 * in_chs
        self.conv_last = nn.Sequential(
            nn.Conv2d(in_chs, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU(inplace=True)
        )
        self.global_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.conv_head = nn.Conv2d(last, head_width, 1, bias=True)
        self.act2 = nn.ReLU(inplace=True)
        self.dropout = dropout
        self.classifier = nn.Linear(head_width, num_classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv_stem(x)))
        x = self.conv_last(self.blocks(x))
        x = self.act2(self.conv_head(self.global_pool(x)))
        x = x.view(x.size(0), -1)
        x = F.dropout(x, p=self.dropout, training=self.training)
        return self.classifier(x)


def ghostnet_cifar(num_classes: int = 10) -> nn.Module:
    """Stride-1 stem (32 -> 16 -> 8 -> 4 -> 2)."""
    return GhostNet(stem_stride=1, num_classes=num_classes)


def ghostnet_tiny_imagenet(num_classes: int = 1000) -> nn.Module:
    """Stride-2 3x3 stem (224 -> 112 -> ... -> 7)."""
    return GhostNet(stem_stride=2, num_classes=num_classes)
