"""A ShuffleNet-like CNN whose channel shuffle is written with constant sizes.

Channel coupling exercised:
- ``n, _, h, w = x.shape`` then ``x.view(n, 2, 24, h, w).transpose(1, 2).contiguous().view(n, 48, h, w)``:
  the group count and channels-per-group are literal numbers in code, not derived from the tensor, so a
  converter that shrinks the 48 channels must also rewrite (or refuse to shrink through) those constants;
- grouped 1x1 convs (2 groups) on both sides of the shuffle, a depthwise 3x3 in between, residual add;
- avg-pool downsampling, adaptive max-pool -> flatten -> dropout -> linear.
"""

from __future__ import annotations

import torch
from torch import nn


class ConstShuffleBlock(nn.Module):
    """48 channels in and out: grouped 1x1 -> shuffle(2 x 24) -> depthwise 3x3 -> grouped 1x1, + input."""

    def __init__(self):
        super().__init__()
        self.gconv1 = nn.Conv2d(48, 48, 1, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(48)
        self.dwconv = nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False)
        self.bn2 = nn.BatchNorm2d(48)
        self.gconv2 = nn.Conv2d(48, 48, 1, groups=2, bias=False)
        self.bn3 = nn.BatchNorm2d(48)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.gconv1(x)))
        n, _, h, w = out.shape
        out = out.view(n, 2, 24, h, w).transpose(1, 2).contiguous().view(n, 48, h, w)
        out = self.bn2(self.dwconv(out))
        out = self.bn3(self.gconv2(out))
        return self.relu(out + x)


class ConstShuffleNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 48, 3, padding=1, bias=False), nn.BatchNorm2d(48), nn.ReLU(inplace=True))
        self.block1 = ConstShuffleBlock()
        self.pool = nn.AvgPool2d(2)
        self.block2 = ConstShuffleBlock()
        self.global_pool = nn.AdaptiveMaxPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x):
        x = self.pool(self.block1(self.stem(x)))
        x = self.pool(self.block2(x))
        x = torch.flatten(self.global_pool(x), 1)
        return self.fc(self.dropout(x))


def const_shuffle_cifar(num_classes: int = 10) -> nn.Module:
    return ConstShuffleNet(num_classes)
