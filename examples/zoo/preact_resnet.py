"""Pre-activation ResNet (He et al. 2016, "Identity Mappings"): BN -> ReLU -> conv ordering.

Channel coupling exercised:
- residual add with no activation after it, so the coupled residual stream runs unbroken through a stage;
- the projection shortcut reads the *pre-activated* tensor (``relu(bn1(x))``), so the shortcut conv and the
  first 3x3 conv share one BN as their input;
- a final BN -> ReLU on the residual stream before global pooling -> linear.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class PreActBlock(nn.Module):
    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_channels != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, layers, widths, stem: str, num_classes: int):
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(3, widths[0], 7, 2, 3, bias=False),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        in_channels = widths[0]
        blocks = []
        for index, (num_blocks, planes) in enumerate(zip(layers, widths)):
            for b in range(num_blocks):
                blocks.append(PreActBlock(in_channels, planes, 2 if (index > 0 and b == 0) else 1))
                in_channels = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        out = self.blocks(self.stem(x))
        out = F.relu(self.bn(out))
        out = self.pool(out)
        out = out.view(out.size(0), -1)
        return self.linear(out)


def preact_resnet14_cifar(num_classes: int = 10) -> nn.Module:
    return PreActResNet((2, 2, 2), (16, 32, 64), stem="cifar", num_classes=num_classes)


def preact_resnet18_tiny_imagenet(num_classes: int = 1000) -> nn.Module:
    return PreActResNet((2, 2, 2, 2), (8, 16, 32, 64), stem="imagenet", num_classes=num_classes)
