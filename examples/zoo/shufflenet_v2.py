"""ShuffleNetV2 (Ma et al. 2018): channel split + two branches + concat + channel shuffle.

Channel coupling exercised:
- stride-1 unit: ``x1, x2 = x.chunk(2, dim=1)``; x1 passes through untouched and is concatenated with the
  branch output of x2, so the two halves of a unit's input come from different places;
- stride-2 unit: both branches read the whole input (a depthwise+pointwise branch1 and a
  pointwise-depthwise-pointwise branch2) and are concatenated;
- channel shuffle written the torchvision way with ``x.size()`` / view / transpose / contiguous / view, which
  interleaves the two concatenated halves (an output channel permutation);
- stem max-pool (ImageNet), global pooling as ``x.mean([2, 3])``.
"""

from __future__ import annotations

import torch
from torch import nn


def channel_shuffle(x, groups: int):
    batch_size, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batch_size, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch_size, num_channels, height, width)


def depthwise_conv(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


class ShuffleV2Unit(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        branch_features = out_channels // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                depthwise_conv(in_channels, stride),
                nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, branch_features, 1, bias=False),
                nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True),
            )
        branch2_in = in_channels if stride > 1 else branch_features
        self.branch2 = nn.Sequential(
            nn.Conv2d(branch2_in, branch_features, 1, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            depthwise_conv(branch_features, stride),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, 1, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, stage_repeats, stage_widths, imagenet_stem: bool, num_classes: int):
        super().__init__()
        stem_width, *widths, last_width = stage_widths
        if imagenet_stem:
            self.conv1 = nn.Sequential(nn.Conv2d(3, stem_width, 3, 2, 1, bias=False), nn.BatchNorm2d(stem_width),
                                       nn.ReLU(inplace=True))
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Sequential(nn.Conv2d(3, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width),
                                       nn.ReLU(inplace=True))
            self.maxpool = nn.Identity()
        in_channels = stem_width
        stages = []
        for repeats, width in zip(stage_repeats, widths):
            units = [ShuffleV2Unit(in_channels, width, 2)]
            units += [ShuffleV2Unit(width, width, 1) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*units))
            in_channels = width
        self.stages = nn.Sequential(*stages)
        self.conv5 = nn.Sequential(nn.Conv2d(in_channels, last_width, 1, bias=False), nn.BatchNorm2d(last_width),
                                   nn.ReLU(inplace=True))
        self.fc = nn.Linear(last_width, num_classes)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        x = self.stages(x)
        x = self.conv5(x)
        x = x.mean([2, 3])
        return self.fc(x)


def shufflenet_v2_cifar(num_classes: int = 10) -> nn.Module:
    """0.5x widths (24 | 48, 96, 192 | 256), two units per stage, stride-1 stem (32 -> 16 -> 8 -> 4)."""
    return ShuffleNetV2((2, 2, 2), (24, 48, 96, 192, 256), imagenet_stem=False, num_classes=num_classes)


def shufflenet_v2_tiny_imagenet(num_classes: int = 1000) -> nn.Module:
    """0.5x widths, real 3x3 stride-2 conv + max-pool stem, repeats (2, 3, 2)."""
    return ShuffleNetV2((2, 3, 2), (24, 48, 96, 192, 256), imagenet_stem=True, num_classes=num_classes)
