"""Dual Path Network (Chen et al. 2017, CIFAR layout of the DPN-26/92 family): residual + dense paths.

Channel coupling exercised:
- slicing of a conv output and of the block input at a constant offset ``d``: ``x[:, :d]`` and ``out[:, :d]``
  are added (residual path, coupled), while ``x[:, d:]`` and ``out[:, d:]`` are concatenated (dense path,
  growing by ``dense_depth`` channels per block): ``cat([x[:, :d] + out[:, :d], x[:, d:], out[:, d:]])``;
- so one conv (``conv3``) produces channels that end up in two differently coupled places;
- grouped 3x3 conv (cardinality 8) inside the bottleneck; 1x1 projection on the first block of a stage;
- a fixed 4x4 average pool -> view -> linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DualPathBlock(nn.Module):
    def __init__(self, last_planes: int, in_planes: int, out_planes: int, dense_depth: int, stride: int,
                 first_layer: bool, groups: int = 8):
        super().__init__()
        self.out_planes = out_planes
        self.dense_depth = dense_depth
        self.conv1 = nn.Conv2d(last_planes, in_planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv2 = nn.Conv2d(in_planes, in_planes, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(in_planes)
        self.conv3 = nn.Conv2d(in_planes, out_planes + dense_depth, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes + dense_depth)
        self.shortcut = nn.Sequential()
        if first_layer:
            self.shortcut = nn.Sequential(
                nn.Conv2d(last_planes, out_planes + dense_depth, 1, stride, bias=False),
                nn.BatchNorm2d(out_planes + dense_depth),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        x = self.shortcut(x)
        d = self.out_planes
        out = torch.cat([x[:, :d, :, :] + out[:, :d, :, :], x[:, d:, :, :], out[:, d:, :, :]], 1)
        return F.relu(out)


class DPN(nn.Module):
    def __init__(self, in_planes=(32, 64), out_planes=(64, 128), num_blocks=(2, 2), dense_depth=(8, 16),
                 num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        last_planes = 32
        stages = []
        for stage, (ip, op, n, dd) in enumerate(zip(in_planes, out_planes, num_blocks, dense_depth)):
            blocks = []
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(DualPathBlock(last_planes, ip, op, dd, stride, first_layer=i == 0))
                last_planes = op + (i + 2) * dd
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AvgPool2d(4)
        self.linear = nn.Linear(last_planes * 2 * 2, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.stages(F.max_pool2d(out, 2))  # 32 -> 16 -> (stage 2) 8
        out = self.pool(out)  # 8 -> 2
        out = out.view(out.size(0), -1)
        return self.linear(out)


def dpn_tiny_cifar(num_classes: int = 10) -> nn.Module:
    """Two stages of two dual-path blocks: residual widths 64/128, dense growth 8/16 (final 128 + 3*16 = 176)."""
    return DPN(num_classes=num_classes)
