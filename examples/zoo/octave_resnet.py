"""A CIFAR ResNet with octave convolutions (Chen et al. 2019): every feature map is a pair, a high-frequency
part at full resolution and a low-frequency part at half resolution.

Channel coupling exercised:
- each octave conv has four paths: high→high, high→low (2x2 average pool, then conv), low→low and
  low→high (conv, then nearest 2x upsampling); the two paths into each part are *added across* resolutions,
  so the producers of a part are tied although their inputs live at different sizes;
- the high→low pooling passes its data by keyword (``F.avg_pool2d(input=high, …)``): fx keeps a builtin's
  keywords as written, and the analysis once crashed on it (IndexError);
- the first octave conv splits a plain map into the pair, the last merges the pair back into a plain map;
- residual adds on both parts, BN and ReLU on both parts, tuples of tensors passed between modules.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class OctaveConv(nn.Module):
    """(high, low) → (high, low); `alpha_in`/`alpha_out` are the low-frequency shares (0: that part is absent)."""

    def __init__(self, in_channels: int, out_channels: int, alpha_in: float = 0.5, alpha_out: float = 0.5,
                 stride: int = 1):
        super().__init__()
        low_in, low_out = int(alpha_in * in_channels), int(alpha_out * out_channels)
        high_in, high_out = in_channels - low_in, out_channels - low_out
        self.stride = stride
        conv = lambda i, o: nn.Conv2d(i, o, 3, 1, 1, bias=False) if i and o else None  # noqa: E731
        self.h2h, self.h2l = conv(high_in, high_out), conv(high_in, low_out)
        self.l2h, self.l2l = conv(low_in, high_out), conv(low_in, low_out)

    def forward(self, x):
        high, low = x if isinstance(x, tuple) else (x, None)
        if self.stride == 2:
            high = F.avg_pool2d(high, 2)
            low = F.avg_pool2d(low, 2) if low is not None else None
        out_high = self.h2h(high) if self.h2h is not None else None
        out_low = self.h2l(F.avg_pool2d(input=high, kernel_size=2, stride=2)) if self.h2l is not None else None
        if low is not None:
            if self.l2h is not None:
                up = F.interpolate(self.l2h(low), scale_factor=2, mode="nearest")
                out_high = out_high + up
            if self.l2l is not None:
                out_low = out_low + self.l2l(low)
        return out_high, out_low


class OctaveBNAct(nn.Module):
    """BN (+ ReLU) on each part of a (high, low) pair."""

    def __init__(self, channels: int, alpha: float, act: bool = True):
        super().__init__()
        low = int(alpha * channels)
        self.bn_high = nn.BatchNorm2d(channels - low)
        self.bn_low = nn.BatchNorm2d(low) if low else None
        self.act = act

    def forward(self, x):
        high, low = x
        high = self.bn_high(high)
        low = self.bn_low(low) if low is not None else None
        if self.act:
            high = F.relu(high)
            low = F.relu(low) if low is not None else None
        return high, low


class OctaveBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1, alpha: float = 0.5):
        super().__init__()
        self.conv1 = OctaveConv(in_channels, channels, alpha, alpha, stride)
        self.bn1 = OctaveBNAct(channels, alpha)
        self.conv2 = OctaveConv(channels, channels, alpha, alpha)
        self.bn2 = OctaveBNAct(channels, alpha, act=False)
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(OctaveConv(in_channels, channels, alpha, alpha, stride),
                                          OctaveBNAct(channels, alpha, act=False))

    def forward(self, x):
        high, low = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        skip_high, skip_low = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(high + skip_high), F.relu(low + skip_low)


class OctaveResNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), blocks_per_stage: int = 1, alpha: float = 0.5, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.split = OctaveConv(widths[0], widths[0], 0.0, alpha)  # plain map → (high, low)
        self.split_bn = OctaveBNAct(widths[0], alpha)
        blocks: list[nn.Module] = []
        in_channels = widths[0]
        for index, width in enumerate(widths):
            for b in range(blocks_per_stage):
                blocks.append(OctaveBlock(in_channels, width, 2 if index > 0 and b == 0 else 1, alpha))
                in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.merge = OctaveConv(in_channels, in_channels, alpha, 0.0)  # (high, low) → plain map
        self.merge_bn = nn.BatchNorm2d(in_channels)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        pair = self.split_bn(self.split(self.stem(x)))
        high, _ = self.merge(self.blocks(pair))
        x = F.relu(self.merge_bn(high))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def octave_resnet8_cifar(num_classes: int = 10) -> nn.Module:
    """Three octave blocks (widths 16/32/64, half the channels at half resolution) between a split and a merge."""
    return OctaveResNet(num_classes=num_classes)
