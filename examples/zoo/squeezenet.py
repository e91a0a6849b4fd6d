"""SqueezeNet 1.1 (Iandola et al. 2016): fire modules and a convolutional classifier.

Channel coupling exercised:
- fire module: 1x1 squeeze -> ReLU -> ``cat([expand1x1, expand3x3], 1)``: two producers at fixed concat
  offsets feeding the next squeeze conv;
- ceil-mode 3x3 stride-2 max-pools between fire groups;
- classifier = dropout -> 1x1 conv to the classes -> ReLU -> adaptive average pool -> flatten (the class
  conv's output must stay whole; no linear layer at all).
"""

from __future__ import annotations

import torch
from torch import nn


class Fire(nn.Module):
    def __init__(self, inplanes: int, squeeze_planes: int, expand1x1_planes: int, expand3x3_planes: int):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            [self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1
        )


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1 at half width (the fire modules' squeeze/expand widths are halved)."""

    def __init__(self, imagenet_stem: bool, num_classes: int):
        super().__init__()
        if imagenet_stem:
            stem = [nn.Conv2d(3, 32, kernel_size=3, stride=2), nn.ReLU(inplace=True)]
        else:
            stem = [nn.Conv2d(3, 32, kernel_size=3, stride=1, padding=1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(
            *stem,
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(32, 8, 32, 32),
            Fire(64, 8, 32, 32),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(64, 16, 64, 64),
            Fire(128, 16, 64, 64),
            nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True),
            Fire(128, 24, 96, 96),
            Fire(192, 24, 96, 96),
            Fire(192, 32, 128, 128),
            Fire(256, 32, 128, 128),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.5),
            nn.Conv2d(256, num_classes, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d((1, 1)),
        )

    def forward(self, x):
        x = self.features(x)
        x = self.classifier(x)
        return torch.flatten(x, 1)


def squeezenet1_1_cifar(num_classes: int = 10) -> nn.Module:
    """Padded stride-1 3x3 stem: 32 -> 16 -> 8 -> 4 spatially."""
    return SqueezeNet(imagenet_stem=False, num_classes=num_classes)


def squeezenet1_1_imagenet(num_classes: int = 1000) -> nn.Module:
    """The real unpadded 3x3 stride-2 stem: 224 -> 111 -> 55 -> 27 -> 13."""
    return SqueezeNet(imagenet_stem=True, num_classes=num_classes)
