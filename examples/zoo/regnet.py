"""RegNetX / RegNetY (Radosavovic et al. 2020): ResNeXt-like blocks parameterised by a fixed group width.

Channel coupling exercised:
- grouped 3x3 conv with group width 8 and widths 24/56/152/368, i.e. 3, 7, 19 and 46 groups (not powers
  of two): channel groups must divide each conv group evenly;
- residual add with 1x1 projection shortcuts at every stage start;
- RegNetY only: SE gate (pool -> 1x1 -> ReLU -> 1x1 -> ``nn.Sigmoid`` -> mul) whose reduce width comes from
  the block input width (0.25 x w_in);
- 3x3 stride-2 stem without max-pool.
"""

from __future__ import annotations

from torch import nn


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.activation = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        scale = self.gate(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class ResBottleneckBlock(nn.Module):
    """RegNet X/Y block with bottleneck ratio 1: 1x1 -> grouped 3x3 (-> SE) -> 1x1, plus shortcut."""

    def __init__(self, w_in: int, w_out: int, stride: int, group_width: int, se_ratio: float | None):
        super().__init__()
        groups = w_out // group_width
        self.a = nn.Sequential(nn.Conv2d(w_in, w_out, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU(inplace=True))
        self.b = nn.Sequential(
            nn.Conv2d(w_out, w_out, 3, stride, 1, groups=groups, bias=False),
            nn.BatchNorm2d(w_out),
            nn.ReLU(inplace=True),
        )
        self.se = SqueezeExcitation(w_out, int(round(se_ratio * w_in))) if se_ratio else nn.Identity()
        self.c = nn.Sequential(nn.Conv2d(w_out, w_out, 1, bias=False), nn.BatchNorm2d(w_out))
        self.proj = None
        if w_in != w_out or stride != 1:
            self.proj = nn.Sequential(nn.Conv2d(w_in, w_out, 1, stride, bias=False), nn.BatchNorm2d(w_out))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        f = self.c(self.se(self.b(self.a(x))))
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + f)


class RegNet(nn.Module):
    def __init__(self, widths, depths, group_width: int, se_ratio: float | None, stem_stride: int, num_classes: int):
        super().__init__()
        stem_width = 16 if stem_stride == 1 else 32
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True)
        )
        blocks = []
        w_in = stem_width
        for width, depth in zip(widths, depths):
            for d in range(depth):
                blocks.append(ResBottleneckBlock(w_in, width, 2 if d == 0 else 1, group_width, se_ratio))
                w_in = width
        self.trunk_output = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(w_in, num_classes)

    def forward(self, x):
        x = self.trunk_output(self.stem(x))
        x = self.avgpool(x)
        x = x.flatten(start_dim=1)
        return self.fc(x)


def regnetx_cifar(num_classes: int = 10) -> nn.Module:
    """RegNetX-200MF's first three stages (24/56/152, group width 8), depths (1, 1, 2), stride-1 stem."""
    return RegNet((24, 56, 152), (1, 1, 2), group_width=8, se_ratio=None, stem_stride=1, num_classes=num_classes)


def regnety_tiny_imagenet(num_classes: int = 1000) -> nn.Module:
    """RegNetY-style, widths 24/56/152/368 (group width 8), depths (1, 1, 2, 1), SE 0.25, 3x3 stride-2 stem."""
    return RegNet((24, 56, 152, 368), (1, 1, 2, 1), group_width=8, se_ratio=0.25, stem_stride=2,
                  num_classes=num_classes)
