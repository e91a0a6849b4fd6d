"""ResNet (He et al. 2015): basic-block and bottleneck residual networks.

Channel coupling exercised:
- residual add: a block's output and its shortcut share channel groups, so the identity shortcuts chain
  every block of a stage into one coupled set;
- option-B projection shortcuts (1x1 conv + BN, also where only the stride changes) that start a new set;
- bottleneck blocks: a 4x expansion where the inner 1x1/3x3 widths are free but the output is coupled;
- global average pool -> flatten -> linear.

CIFAR variants: 3x3 stride-1 stem at 32x32, widths 16/32/64. ImageNet variants: the real 7x7 stride-2
conv + 3x3 stride-2 max-pool stem and four stages, at 1/8 of the real widths.
"""

from __future__ import annotations

import torch
from torch import nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_channels != planes:
            self.downsample = nn.Sequential(conv1x1(in_channels, planes, stride), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers, widths, stem: str, num_classes: int, in_channels: int = 3):
        super().__init__()
        image_channels = in_channels
        stem_width = widths[0]
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(image_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(conv3x3(image_channels, stem_width), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True))
        in_channels = stem_width
        stages = []
        for index, (num_blocks, planes) in enumerate(zip(layers, widths)):
            blocks = []
            for b in range(num_blocks):
                stride = 2 if (index > 0 and b == 0) else 1
                blocks.append(block(in_channels, planes, stride))
                in_channels = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.layers(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet20_cifar(num_classes: int = 10) -> nn.Module:
    """ResNet-20 (3x3 basic blocks), widths 16/32/64, option-B projections at the two stage changes."""
    return ResNet(BasicBlock, (3, 3, 3), (16, 32, 64), stem="cifar", num_classes=num_classes)


def resnet20_fashion(num_classes: int = 10) -> nn.Module:
    """ResNet-20 for 1×28×28 greyscale images (Fashion-MNIST): the search benchmark's and demo's model."""
    return ResNet(BasicBlock, (3, 3, 3), (16, 32, 64), stem="cifar", num_classes=num_classes, in_channels=1)


def resnet29_bottleneck_cifar(num_classes: int = 10) -> nn.Module:
    """3 stages x 3 bottlenecks, planes 16/32/64 -> outputs 64/128/256 (projection also in block 1)."""
    return ResNet(Bottleneck, (3, 3, 3), (16, 32, 64), stem="cifar", num_classes=num_classes)


def resnet18_tiny_imagenet(num_classes: int = 1000) -> nn.Module:
    """ResNet-18 depth (2, 2, 2, 2) at widths 8/16/32/64."""
    return ResNet(BasicBlock, (2, 2, 2, 2), (8, 16, 32, 64), stem="imagenet", num_classes=num_classes)


def resnet26_bottleneck_tiny_imagenet(num_classes: int = 1000) -> nn.Module:
    """Bottleneck ResNet (2, 2, 2, 2), planes 8/16/32/64 -> outputs 32/64/128/256."""
    return ResNet(Bottleneck, (2, 2, 2, 2), (8, 16, 32, 64), stem="imagenet", num_classes=num_classes)


def resnet18(num_classes: int = 1000) -> nn.Module:
    """ResNet-18 at its real widths 64/128/256/512 (11.7 M parameters, 1.8 GMACs at 3×224×224): the size a user
    deploys, for latency and memory measurements."""
    return ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), stem="imagenet", num_classes=num_classes)


def resnet110_fashion(num_classes: int = 10) -> nn.Module:
    """ResNet-110 (18 basic blocks a stage) for 1×28×28 images: 57 free channel sets, for how the search scales
    with the number of sets (`benchmarks/search_scaling.py`)."""
    return ResNet(BasicBlock, (18, 18, 18), (16, 32, 64), stem="cifar", num_classes=num_classes, in_channels=1)


def resnet164_fashion(num_classes: int = 10) -> nn.Module:
    """ResNet-164 (18 bottlenecks a stage, planes 16/32/64) for 1×28×28 images: over 100 free channel sets."""
    return ResNet(Bottleneck, (18, 18, 18), (16, 32, 64), stem="cifar", num_classes=num_classes, in_channels=1)
