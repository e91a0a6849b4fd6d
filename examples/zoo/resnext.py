"""ResNeXt (Xie et al. 2017): bottlenecks whose 3x3 conv is grouped (cardinality 8).

Channel coupling exercised:
- grouped 3x3 conv: input and output channels are split into 8 groups, so channel groups of the inner
  width must align with the conv groups (a group may only shrink uniformly across the 8 conv groups);
- residual add with option-B 1x1 projection shortcuts;
- global average pool -> flatten -> linear.
"""

from __future__ import annotations

import torch
from torch import nn


class ResNeXtBlock(nn.Module):
    def __init__(self, in_channels: int, inner_width: int, out_channels: int, stride: int, cardinality: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(in_channels, inner_width, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(inner_width)
        self.conv_grouped = nn.Conv2d(inner_width, inner_width, 3, stride, 1, groups=cardinality, bias=False)
        self.bn_grouped = nn.BatchNorm2d(inner_width)
        self.conv_expand = nn.Conv2d(inner_width, out_channels, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        out = torch.relu(self.bn_reduce(self.conv_reduce(x)))
        out = torch.relu(self.bn_grouped(self.conv_grouped(out)))
        out = self.bn_expand(self.conv_expand(out))
        return torch.relu(out + self.shortcut(x))


class ResNeXt(nn.Module):
    def __init__(self, layers, base_width: int, cardinality: int, stem: str, stem_width: int, num_classes: int):
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(3, stem_width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU()
            )
        in_channels = stem_width
        blocks = []
        for stage, num_blocks in enumerate(layers):
            inner_width = cardinality * base_width * 2**stage
            out_channels = 2 * inner_width
            for b in range(num_blocks):
                stride = 2 if (stage > 0 and b == 0) else 1
                blocks.append(ResNeXtBlock(in_channels, inner_width, out_channels, stride, cardinality))
                in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


def resnext20_8x4d_cifar(num_classes: int = 10) -> nn.Module:
    """Cardinality 8, 4 channels per group in stage 1 (inner 32/64/128, outputs 64/128/256), 2 blocks per stage."""
    return ResNeXt((2, 2, 2), base_width=4, cardinality=8, stem="cifar", stem_width=32, num_classes=num_classes)


def resnext14_8x2d_tiny_imagenet(num_classes: int = 1000) -> nn.Module:
    """Cardinality 8, 2 channels per group in stage 1 (inner 16..128, outputs 32..256), one block per stage."""
    return ResNeXt((1, 1, 1, 1), base_width=2, cardinality=8, stem="imagenet", stem_width=16, num_classes=num_classes)
