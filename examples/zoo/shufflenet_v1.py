"""ShuffleNet v1 (Zhang et al. 2018): grouped 1x1 convs + channel shuffle, concat-based downsampling.

Channel coupling exercised:
- grouped 1x1 convs (``groups`` = 2, 3 or 8): a group of the conv's output only reads its own input group;
- channel shuffle after the first grouped conv (written with ``reshape`` / ``permute`` / ``reshape``), which
  redistributes every conv group over all groups of the next conv;
- stride-1 units: residual add; stride-2 units: ``cat([avg_pool(x), branch(x)])``, i.e. concat offsets where
  the shortcut part keeps the input's channel groups;
- the first unit of stage 2 has an ungrouped first 1x1 conv (its 24-channel input is too narrow to group).

The number of groups is an argument of the factories (``shufflenet_v1_cifar(groups=3)``); the output widths
are 16 * groups * (1, 2, 4), so every grouped conv divides evenly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def shuffle_channels(x, groups: int):
    n, c, h, w = x.shape
    x = x.reshape(n, groups, c // groups, h, w)
    x = x.permute(0, 2, 1, 3, 4)
    return x.reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, stride: int, group_first_conv: bool = True):
        super().__init__()
        self.groups = groups
        self.stride = stride
        self.first_groups = groups if group_first_conv else 1
        mid_channels = out_channels // 4
        branch_out = out_channels - in_channels if stride == 2 else out_channels
        self.gconv1 = nn.Conv2d(in_channels, mid_channels, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.dwconv = nn.Conv2d(mid_channels, mid_channels, 3, stride, 1, groups=mid_channels, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.gconv2 = nn.Conv2d(mid_channels, branch_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_out)

    def forward(self, x):
        out = F.relu(self.bn1(self.gconv1(x)))
        out = shuffle_channels(out, self.groups)
        out = self.bn2(self.dwconv(out))
        out = self.bn3(self.gconv2(out))
        if self.stride == 2:
            shortcut = F.avg_pool2d(x, kernel_size=3, stride=2, padding=1)
            return F.relu(torch.cat([shortcut, out], 1))
        return F.relu(x + out)


class ShuffleNetV1(nn.Module):
    def __init__(self, groups: int, stage_repeats, imagenet_stem: bool, num_classes: int):
        super().__init__()
        stem_width = 24
        if imagenet_stem:
            self.stem = nn.Sequential(nn.Conv2d(3, stem_width, 3, 2, 1, bias=False), nn.BatchNorm2d(stem_width),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width),
                                      nn.ReLU(inplace=True))
        in_channels = stem_width
        units = []
        for stage, repeats in enumerate(stage_repeats):
            out_channels = 16 * groups * 2**stage
            for r in range(repeats):
                if r == 0:
                    units.append(ShuffleUnit(in_channels, out_channels, groups, 2, group_first_conv=stage > 0))
                else:
                    units.append(ShuffleUnit(out_channels, out_channels, groups, 1))
                in_channels = out_channels
        self.units = nn.Sequential(*units)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        x = self.units(self.stem(x))
        x = self.pool(x).view(x.size(0), -1)
        return self.fc(x)


def shufflenet_v1_cifar(groups: int = 3, num_classes: int = 10) -> nn.Module:
    """Stride-1 stem, three stages of (stride-2 concat unit + one residual unit): 32 -> 16 -> 8 -> 4."""
    return ShuffleNetV1(groups, (2, 2, 2), imagenet_stem=False, num_classes=num_classes)


def shufflenet_v1_g2_cifar() -> nn.Module:
    return shufflenet_v1_cifar(groups=2)


def shufflenet_v1_g3_cifar() -> nn.Module:
    return shufflenet_v1_cifar(groups=3)


def shufflenet_v1_g8_cifar() -> nn.Module:
    return shufflenet_v1_cifar(groups=8)


def shufflenet_v1_tiny_imagenet(groups: int = 3, num_classes: int = 1000) -> nn.Module:
    """3x3 stride-2 conv + max-pool stem, repeats (2, 3, 2)."""
    return ShuffleNetV1(groups, (2, 3, 2), imagenet_stem=True, num_classes=num_classes)
