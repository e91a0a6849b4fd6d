"""A ConvNeXt-like CNN with learnable per-channel layer scale (Touvron et al. 2021 / Liu et al. 2022).

Channel coupling exercised:
- ``x * self.gamma.view(1, -1, 1, 1)`` with ``self.gamma = nn.Parameter(torch.ones(C))``: a per-channel
  parameter (not a module) multiplies the block output, so gamma's entries must be sliced with the channels
  of the 1x1 projection that produces them, and the residual add couples them to the stream;
- depthwise 7x7 conv, inverted 4x MLP with GELU, residual add;
- patchify stem (4x4 stride-4 conv) and 2x2 stride-2 conv downsampling, global average pool as
  ``x.mean((-2, -1))``, linear head.

gamma is initialised to ones (ConvNeXt uses 1e-6); tests that want a non-trivial scale should perturb it.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerScaleBlock(nn.Module):
    def __init__(self, channels: int, expansion: int = 4):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.BatchNorm2d(channels)
        self.pwconv1 = nn.Conv2d(channels, expansion * channels, 1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(expansion * channels, channels, 1)
        self.gamma = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        out = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        out = out * self.gamma.view(1, -1, 1, 1)
        return x + out


class LayerScaleNet(nn.Module):
    def __init__(self, widths=(32, 64), depths=(2, 2), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 4, stride=4), nn.BatchNorm2d(widths[0]))
        layers: list[nn.Module] = []
        in_channels = widths[0]
        for index, (width, depth) in enumerate(zip(widths, depths)):
            if index > 0:
                layers += [nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, width, 2, stride=2)]
            layers += [LayerScaleBlock(width) for _ in range(depth)]
            in_channels = width
        self.stages = nn.Sequential(*layers)
        self.norm = nn.BatchNorm1d(in_channels)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        x = x.mean((-2, -1))
        return self.head(self.norm(x))


def layer_scale_cifar(num_classes: int = 10) -> nn.Module:
    """32x32 -> 8x8 (patchify) -> 4x4; widths 32/64, two blocks each."""
    return LayerScaleNet(num_classes=num_classes)
