"""Wide ResNet (Zagoruyko & Komodakis 2016): few, wide pre-activation blocks with dropout inside.

Channel coupling exercised:
- residual add (pre-activation, so the residual stream is only normalised inside the next block);
- a 1x1 projection shortcut at every width change, reading the pre-activated tensor;
- dropout *between* the two 3x3 convs of a block (identity in eval mode);
- bottleneck variant (ImageNet): the 3x3 stage is 2x wider than a ResNet's, output width unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WideBasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.equal_in_out = in_channels == out_channels and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x):
        activated = self.relu1(self.bn1(x))
        out = self.conv1(activated)
        out = self.dropout(self.relu2(self.bn2(out)))
        out = self.conv2(out)
        if self.equal_in_out:
            return x + out
        return self.shortcut(activated) + out


class WideResNetCifar(nn.Module):
    """WRN-depth-k: (depth - 4) / 6 blocks per stage, widths 16k/32k/64k."""

    def __init__(self, depth: int = 16, widen_factor: int = 2, dropout: float = 0.3, num_classes: int = 10):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks = []
        in_channels = widths[0]
        for stage, width in enumerate(widths[1:]):
            for b in range(n):
                blocks.append(WideBasicBlock(in_channels, width, 2 if (stage > 0 and b == 0) else 1, dropout))
                in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        out = self.blocks(self.conv1(x))
        out = self.relu(self.bn(out))
        out = F.avg_pool2d(out, 8)  # 8x8 map at 32x32 input
        out = out.view(-1, self.fc.in_features)
        return self.fc(out)


class WideBottleneck(nn.Module):
    """torchvision wide_resnet50_2 block: bottleneck width doubled, expansion 4 over the *base* planes."""

    def __init__(self, in_channels: int, planes: int, stride: int, width_multiplier: int = 2):
        super().__init__()
        width = planes * width_multiplier
        out_channels = planes * 4
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class WideResNetImageNet(nn.Module):
    def __init__(self, layers=(1, 2, 1, 1), planes=(8, 16, 32, 64), num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, planes[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        blocks = []
        in_channels = planes[0]
        for stage, (num_blocks, p) in enumerate(zip(layers, planes)):
            for b in range(num_blocks):
                blocks.append(WideBottleneck(in_channels, p, 2 if (stage > 0 and b == 0) else 1))
                in_channels = p * 4
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.blocks(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def wrn16_2_cifar(num_classes: int = 10) -> nn.Module:
    """WRN-16-2: two blocks per stage at widths 32/64/128, dropout 0.3 inside blocks."""
    return WideResNetCifar(depth=16, widen_factor=2, dropout=0.3, num_classes=num_classes)


def wide_resnet_tiny_imagenet(num_classes: int = 1000) -> nn.Module:
    """wide_resnet50_2-style bottlenecks at 1/8 width, depth (1, 2, 1, 1)."""
    return WideResNetImageNet(num_classes=num_classes)
