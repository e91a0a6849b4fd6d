"""A CIFAR ResNet with CBAM attention (Woo et al. 2018) after every residual branch.

Channel coupling exercised:
- channel attention: global average *and* global max pooling share one 1x1-conv MLP whose two outputs are
  added, then a sigmoid gate multiplies the branch (the MLP's hidden width is a set of its own);
- spatial attention: ``torch.mean(x, dim=1, keepdim=True)`` and ``torch.max(x, dim=1)[0]`` reduce *over the
  channels*, are concatenated and fed to a 7x7 conv. Over fewer channels a mean or a max is a different
  function than over all channels with zeros, so the channels feeding them cannot be slimmed position-wise;
- residual add and projection shortcuts as in ResNet-20.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x):
        avg = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        mx = self.fc2(F.relu(self.fc1(F.adaptive_max_pool2d(x, 1))))
        return x * torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x):
        mean = torch.mean(x, dim=1, keepdim=True)
        peak = torch.max(x, dim=1)[0].unsqueeze(1)
        return x * torch.sigmoid(self.conv(torch.cat([mean, peak], 1)))


class CBAMBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.channel_attention = ChannelAttention(channels)
        self.spatial_attention = SpatialAttention()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.spatial_attention(self.channel_attention(out))
        return F.relu(out + self.shortcut(x))


class CBAMResNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), blocks_per_stage: int = 2, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        blocks: list[nn.Module] = []
        in_channels = widths[0]
        for index, width in enumerate(widths):
            for b in range(blocks_per_stage):
                blocks.append(CBAMBlock(in_channels, width, 2 if index > 0 and b == 0 else 1))
                in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def cbam_resnet14_cifar(num_classes: int = 10) -> nn.Module:
    """ResNet-14 (2 blocks per stage, widths 16/32/64) with CBAM in every block."""
    return CBAMResNet(num_classes=num_classes)
