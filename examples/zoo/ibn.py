"""IBN-Net-a style ResNet (Pan et al. 2018): half InstanceNorm / half BatchNorm after the first conv.

Channel coupling exercised:
- ``torch.split`` of a conv output into an InstanceNorm part and a BatchNorm part, re-joined with
  ``torch.cat``: each producer channel goes through exactly one of the two norms, so channel groups must
  not straddle the split point (or the split sizes must shrink with them). Three ways to write the split:
  * ``ibn_const_split_cifar``: literal, unequal sizes in code: ``torch.split(x, [12, 20], 1)``;
  * ``ibn_dynamic_split_cifar``: sizes computed from the tensor: ``x.size(1) * 3 // 8`` (12 of 32);
  * ``ibn_half_split_cifar``: the original IBN-Net code, an int split size ``torch.split(x, self.half, 1)``
    giving two equal halves;
- InstanceNorm2d(affine=True) (per-sample statistics even in eval mode), residual add, projections.

IBN layers sit only in the 32-wide first stage, as IBN-Net puts them only in early layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class IBNConstSplit(nn.Module):
    """For exactly 32 channels: 12 instance-normalised, 20 batch-normalised (sizes written in code)."""

    def __init__(self, planes: int = 32):
        super().__init__()
        assert planes == 32, "the split sizes [12, 20] are written for 32 channels"
        self.instance_norm = nn.InstanceNorm2d(12, affine=True)
        self.batch_norm = nn.BatchNorm2d(20)

    def forward(self, x):
        in_part, bn_part = torch.split(x, [12, 20], 1)
        return torch.cat([self.instance_norm(in_part), self.batch_norm(bn_part)], 1)


class IBNDynamicSplit(nn.Module):
    """3/8 of the channels (computed from ``x.size(1)`` at run time) instance-normalised, the rest batch-normalised."""

    def __init__(self, planes: int):
        super().__init__()
        self.instance_norm = nn.InstanceNorm2d(planes * 3 // 8, affine=True)
        self.batch_norm = nn.BatchNorm2d(planes - planes * 3 // 8)

    def forward(self, x):
        num_instance = x.size(1) * 3 // 8
        in_part, bn_part = torch.split(x, [num_instance, x.size(1) - num_instance], 1)
        return torch.cat((self.instance_norm(in_part), self.batch_norm(bn_part)), 1)


class IBNHalfSplit(nn.Module):
    """The original IBN-Net layer: an int split size, so ``torch.split`` returns two equal halves."""

    def __init__(self, planes: int, ratio: float = 0.5):
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x):
        split = torch.split(x, self.half, 1)
        out1 = self.IN(split[0].contiguous())
        out2 = self.BN(split[1].contiguous())
        return torch.cat((out1, out2), 1)


class IBNBasicBlock(nn.Module):
    def __init__(self, in_channels: int, planes: int, stride: int, ibn_layer):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn1 = ibn_layer(planes) if ibn_layer is not None else nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_channels != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + residual)


class IBNResNet(nn.Module):
    def __init__(self, ibn_layer, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.layer1 = nn.Sequential(IBNBasicBlock(32, 32, 1, ibn_layer), IBNBasicBlock(32, 32, 1, ibn_layer))
        self.layer2 = nn.Sequential(IBNBasicBlock(32, 64, 2, None), IBNBasicBlock(64, 64, 1, None))
        self.layer3 = nn.Sequential(IBNBasicBlock(64, 128, 2, None))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def ibn_const_split_cifar(num_classes: int = 10) -> nn.Module:
    return IBNResNet(IBNConstSplit, num_classes)


def ibn_dynamic_split_cifar(num_classes: int = 10) -> nn.Module:
    return IBNResNet(IBNDynamicSplit, num_classes)


def ibn_half_split_cifar(num_classes: int = 10) -> nn.Module:
    return IBNResNet(IBNHalfSplit, num_classes)
