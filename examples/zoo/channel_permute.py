"""A small CNN that reorders channels with ``torch.index_select`` and a constant index buffer.

Channel coupling exercised:
- ``torch.index_select(x, 1, self.order)`` with a registered (non-trainable, saved) int64 buffer: output
  channel j is input channel ``order[j]``, a fixed permutation the converter must carry through (the conv
  after it sees the producer's channels in a different order);
- a permutation applied inside a residual block (the permuted branch is added back onto the unpermuted
  input: channel j of the sum couples producer channel j with producer channel order[j]);
- max-pool downsampling, a flatten of a 4x4 map into the linear classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def strided_permutation(channels: int, step: int) -> torch.Tensor:
    """``[0, step, 2*step, ...] mod channels`` (a permutation when gcd(step, channels) == 1)."""
    return (torch.arange(channels) * step) % channels


class PermutedConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, order: torch.Tensor):
        super().__init__()
        self.register_buffer("order", order)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        x = torch.index_select(x, 1, self.order)
        return F.relu(self.bn(self.conv(x)))


class PermutedResidual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.register_buffer("order", torch.arange(channels).flip(0))

    def forward(self, x):
        out = self.bn(self.conv(x))
        out = torch.index_select(out, 1, self.order)
        return F.relu(x + out)


class ChannelPermuteNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        self.layer1 = PermutedConv(24, 32, strided_permutation(24, 5))
        self.layer2 = PermutedResidual(32)
        self.layer3 = PermutedConv(32, 48, strided_permutation(32, 7))
        self.fc = nn.Linear(48 * 4 * 4, num_classes)

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 2)
        x = F.max_pool2d(self.layer1(x), 2)
        x = self.layer2(x)
        x = F.max_pool2d(self.layer3(x), 2)
        return self.fc(torch.flatten(x, 1))


def channel_permute_cifar(num_classes: int = 10) -> nn.Module:
    return ChannelPermuteNet(num_classes)
