"""VGG (Simonyan & Zisserman 2014): plain 3x3 conv stacks with max-pool downsampling.

Channel coupling exercised:
- flatten -> linear on a spatial map: the last conv's channel c feeds the classifier's input features
  ``c * H * W ... (c + 1) * H * W - 1`` (a 2x2 map on CIFAR, a 7x7 adaptive-pooled map on ImageNet);
- a multi-layer MLP classifier (linear -> ReLU -> dropout -> linear) whose hidden units are channels too.

``vgg11_bn_cifar`` uses conv + BatchNorm without conv bias; ``vgg11_tiny_imagenet`` is the original
BN-free VGG (conv bias, no BatchNorm) at 1/8 width with the adaptive 7x7 pool in front of the MLP.
"""

from __future__ import annotations

import torch
from torch import nn

# "M" is a 2x2 max-pool; ints are 3x3 conv widths.
VGG11_CIFAR = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M")  # 32x32 -> 2x2 map
VGG11_TINY_IMAGENET = (8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M")  # 224x224 -> 7x7 map
VGG8_FASHION = (32, "M", 64, "M", 128, 128, "M", 256, 256)  # 28x28 -> 3x3 map


def make_features(config, batch_norm: bool, in_channels: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        if batch_norm:
            layers += [nn.Conv2d(in_channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item)]
            layers.append(nn.ReLU(inplace=True))
        else:
            layers += [nn.Conv2d(in_channels, item, 3, padding=1), nn.ReLU(inplace=True)]
        in_channels = item
    return nn.Sequential(*layers)


class VGGCifar(nn.Module):
    """VGG with BatchNorm; the last conv's map (256 x 2 x 2 for VGG-11 on CIFAR) is flattened straight into the
    classifier."""

    def __init__(self, num_classes: int = 10, hidden: int = 256, config=VGG11_CIFAR, in_channels: int = 3,
                 map_size: int = 2):
        super().__init__()
        self.features = make_features(config, batch_norm=True, in_channels=in_channels)
        self.classifier = nn.Sequential(
            nn.Linear([c for c in config if c != "M"][-1] * map_size * map_size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


class VGGImageNet(nn.Module):
    """torchvision-style VGG: features -> AdaptiveAvgPool2d((7, 7)) -> flatten -> 3-layer MLP."""

    def __init__(self, num_classes: int = 1000, hidden: int = 128):
        super().__init__()
        self.features = make_features(VGG11_TINY_IMAGENET, batch_norm=False)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(64 * 7 * 7, hidden),
            nn.ReLU(True),
            nn.Dropout(0.5),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg11_bn_cifar(num_classes: int = 10) -> nn.Module:
    return VGGCifar(num_classes)


def vgg8_bn_fashion(num_classes: int = 10) -> nn.Module:
    """A plain VGG-style net for 1x28x28 images (6 convs, 3 max-pools, 256 x 3 x 3 flattened into a 2-layer MLP):
    the search benchmark's network without shortcuts (issue 13)."""
    return VGGCifar(num_classes, config=VGG8_FASHION, in_channels=1, map_size=3)


def vgg11_tiny_imagenet(num_classes: int = 1000) -> nn.Module:
    return VGGImageNet(num_classes)
