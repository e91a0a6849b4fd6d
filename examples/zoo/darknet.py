"""DarkNet-53-style and CSPDarkNet-style backbones: conv-BN-LeakyReLU(0.1), residual and CSP stages.

Channel coupling exercised:
- residual add of ``3x3(1x1(x))`` onto x (the 1x1 halves the width, the 3x3 restores it);
- stride-2 3x3 convs as the only downsampling (no pooling until the global average pool);
- CSP stage: ``part1, part2 = torch.split(x, self.half_channels, dim=1)`` with an int split size fixed in
  ``__init__``; only part2 runs through the residual blocks, then ``cat([blocks(part2), part1])`` (note the
  swapped order) feeds a 1x1 transition conv;
- LeakyReLU everywhere.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBNLeaky(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.1, inplace=True),
        )


class DarkResidual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.reduce = ConvBNLeaky(channels, channels // 2, 1)
        self.expand = ConvBNLeaky(channels // 2, channels, 3)

    def forward(self, x):
        return x + self.expand(self.reduce(x))


class CSPStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int):
        super().__init__()
        self.downsample = ConvBNLeaky(in_channels, out_channels, 3, stride=2)
        self.half_channels = out_channels // 2
        self.blocks = nn.Sequential(*[DarkResidual(self.half_channels) for _ in range(num_blocks)])
        self.transition = ConvBNLeaky(out_channels, out_channels, 1)

    def forward(self, x):
        x = self.downsample(x)
        part1, part2 = torch.split(x, self.half_channels, dim=1)
        part2 = self.blocks(part2)
        return self.transition(torch.cat([part2, part1], dim=1))


def residual_stage(in_channels: int, out_channels: int, num_blocks: int) -> nn.Sequential:
    return nn.Sequential(ConvBNLeaky(in_channels, out_channels, 3, stride=2),
                         *[DarkResidual(out_channels) for _ in range(num_blocks)])


class DarkNet(nn.Module):
    def __init__(self, widths, blocks, csp: bool, num_classes: int):
        super().__init__()
        self.stem = ConvBNLeaky(3, widths[0], 3)
        stages = []
        in_channels = widths[0]
        for width, num_blocks in zip(widths[1:], blocks):
            if csp:
                stages.append(CSPStage(in_channels, width, num_blocks))
            else:
                stages.append(residual_stage(in_channels, width, num_blocks))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def darknet_cifar(num_classes: int = 10) -> nn.Module:
    """DarkNet-53 layout cut to 3 stages (1, 2, 2 residual blocks), widths 16 | 32, 64, 128."""
    return DarkNet((16, 32, 64, 128), (1, 2, 2), csp=False, num_classes=num_classes)


def cspdarknet_cifar(num_classes: int = 10) -> nn.Module:
    """CSP stages (1, 2, 1 residual blocks on the split half), widths 16 | 32, 64, 128."""
    return DarkNet((16, 32, 64, 128), (1, 2, 1), csp=True, num_classes=num_classes)


def cspdarknet_tiny_imagenet(num_classes: int = 1000) -> nn.Module:
    """Real DarkNet stem (3x3 stride-1 conv at 224, then stride-2 convs), five CSP stages down to 7x7."""
    return DarkNet((8, 16, 32, 64, 128, 128), (1, 1, 2, 2, 1), csp=True, num_classes=num_classes)
