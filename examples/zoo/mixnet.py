"""MixNet-style mixed depthwise convolution (Tan & Le 2019): one kernel size per channel chunk.

Channel coupling exercised:
- ``torch.split(x, [24, 12, 12], 1)`` with constant, unequal chunk sizes, a depthwise conv with a
  different kernel (3x3, 5x5, 7x7) per chunk, and ``torch.cat`` back: each chunk is its own channel range
  through the concat, inside an inverted-residual block (1x1 expand -> mixed depthwise -> 1x1 project,
  residual add);
- two ways to write the same block:
  * ``mixnet_loop_cifar``: iterates in Python over the split result
    (``for chunk, conv in zip(torch.split(x, self.splits, 1), self.convs)``). torch.fx symbolic tracing
    cannot iterate a Proxy, so this model deliberately needs the converter's tracing fallback;
  * ``mixnet_indexed_cifar``: indexes the pieces explicitly (``pieces[0]``, ``pieces[1]``, ...), which
    traces symbolically;
- SiLU in the mixed blocks, ReLU in the stem, max-pool downsampling.
"""

from __future__ import annotations

import torch
from torch import nn

SPLITS = [24, 12, 12]
KERNELS = [3, 5, 7]


class MixedDepthwiseLoop(nn.Module):
    def __init__(self, splits=SPLITS, kernels=KERNELS):
        super().__init__()
        self.splits = list(splits)
        self.convs = nn.ModuleList(
            nn.Conv2d(c, c, k, 1, k // 2, groups=c, bias=False) for c, k in zip(self.splits, kernels)
        )

    def forward(self, x):
        outputs = []
        for chunk, conv in zip(torch.split(x, self.splits, 1), self.convs):
            outputs.append(conv(chunk))
        return torch.cat(outputs, 1)


class MixedDepthwiseIndexed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3x3 = nn.Conv2d(24, 24, 3, 1, 1, groups=24, bias=False)
        self.conv5x5 = nn.Conv2d(12, 12, 5, 1, 2, groups=12, bias=False)
        self.conv7x7 = nn.Conv2d(12, 12, 7, 1, 3, groups=12, bias=False)

    def forward(self, x):
        pieces = torch.split(x, [24, 12, 12], dim=1)
        return torch.cat([self.conv3x3(pieces[0]), self.conv5x5(pieces[1]), self.conv7x7(pieces[2])], dim=1)


class MixBlock(nn.Module):
    def __init__(self, channels: int, mixed_conv: nn.Module, hidden: int = 48):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.SiLU())
        self.mixed = mixed_conv
        self.bn = nn.BatchNorm2d(hidden)
        self.act = nn.SiLU()
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        out = self.expand(x)
        out = self.act(self.bn(self.mixed(out)))
        return x + self.project(out)


class MixNetTiny(nn.Module):
    def __init__(self, mixed_conv_cls, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        self.block1 = MixBlock(24, mixed_conv_cls())
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = MixBlock(24, mixed_conv_cls())
        self.pool2 = nn.MaxPool2d(2)
        self.head = nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.pool1(self.block1(self.stem(x)))
        x = self.pool2(self.block2(x))
        x = self.head(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))


def mixnet_loop_cifar(num_classes: int = 10) -> nn.Module:
    return MixNetTiny(MixedDepthwiseLoop, num_classes)


def mixnet_indexed_cifar(num_classes: int = 10) -> nn.Module:
    return MixNetTiny(MixedDepthwiseIndexed, num_classes)
