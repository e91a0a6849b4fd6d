"""A DiCENet-style CNN (Mehta et al. 2020): dimension-wise convolutions, where height and width take the
place of channels in turn.

Channel coupling exercised:
- DimConv: a depthwise 3x3 conv along the channels (the usual one), one along the height (the map transposed
  to N, H, C, W, a depthwise conv with one filter per *row*), one along the width (N, W, H, C); the last two
  slide a 3-tap kernel across the channel axis, and their weights count rows and columns, not channels;
- the three results interleaved per channel (stack + flatten) and fused by a grouped 1x1 conv (groups = C,
  three inputs per group), then a squeeze-excitation channel gate (its reduced width is a set of its own);
- efficient channel fusion: a pointwise conv widens or keeps the channels between DiCE units; a 1x1 conv head
  widens the features before pooling (a free set).

The sizes are fixed by the input resolution (the H- and W-wise convs have H and W channels): 32x32 only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DimConv(nn.Module):
    """Depthwise convs along channels, height and width of an N, C, H, W map, fused per channel."""

    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self.along_c = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.along_h = nn.Conv2d(height, height, 3, padding=1, groups=height, bias=False)
        self.along_w = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.fuse = nn.Conv2d(3 * channels, channels, 1, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.squeeze = nn.Conv2d(channels, max(channels // 4, 4), 1)
        self.excite = nn.Conv2d(max(channels // 4, 4), channels, 1)

    def forward(self, x):
        c = self.along_c(x)
        h = self.along_h(x.transpose(1, 2)).transpose(1, 2)
        w = self.along_w(x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)
        y = F.relu(self.bn(self.fuse(torch.stack([c, h, w], 2).flatten(1, 2))))
        return y * torch.sigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(y, 1)))))


class DiCEUnit(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, size: int):
        super().__init__()
        self.dim_conv = DimConv(in_channels, size, size)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.residual = in_channels == out_channels

    def forward(self, x):
        y = self.bn(self.pointwise(self.dim_conv(x)))
        return F.relu(y + x if self.residual else y)


class DiCENet(nn.Module):
    def __init__(self, widths=(16, 32, 64), size: int = 32, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        size //= 2
        units: list[nn.Module] = []
        in_channels = widths[0]
        for index, width in enumerate(widths):
            if index > 0:
                units.append(nn.AvgPool2d(2))
                size //= 2
            units += [DiCEUnit(in_channels, width, size), DiCEUnit(width, width, size)]
            in_channels = width
        self.units = nn.Sequential(*units)
        self.head = nn.Sequential(nn.Conv2d(in_channels, 2 * in_channels, 1), nn.ReLU())
        self.fc = nn.Linear(2 * in_channels, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.head(self.units(self.stem(x))), 1).flatten(1))


def dicenet_cifar(num_classes: int = 10) -> nn.Module:
    """Stem to 16x16, three stages (16/32/64 channels at 16/8/4 pixels), two DiCE units each."""
    return DiCENet(num_classes=num_classes)
