"""A small two-head, single-stage detector (RetinaNet/FCOS-style): a backbone, an FPN neck over two levels,
and a classification head and a box-regression head shared by both levels.

The model returns a tuple ``(class_logits, box_deltas)`` of shapes ``(N, anchors, num_classes)`` and
``(N, anchors, 4)``, where the anchors of both levels are concatenated (finest level first).

Channel coupling exercised:
- backbone: stride-2 conv-BN-ReLU stages with residual blocks;
- FPN: 1x1 lateral convs to one neck width, nearest 2x ``F.interpolate`` of the coarse level added onto
  the fine lateral (every level's neck channels are one coupled set), 3x3 smoothing convs;
- heads: the same conv modules called on both levels (shared weights), each ending in a conv to
  ``anchors * outputs`` channels that is permuted to NHWC, reshaped to ``(N, -1, outputs)`` and
  concatenated over the levels along the anchor dimension (the outputs stay whole).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv_bn_relu(channels, channels)
        self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return F.relu(x + self.conv2(self.conv1(x)))


class Head(nn.Module):
    """A 3x3 tower, then a conv to ``anchors * outputs`` channels, flattened to ``(N, H*W*anchors, outputs)``."""

    def __init__(self, channels: int, anchors: int, outputs: int):
        super().__init__()
        self.outputs = outputs
        self.tower = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), nn.ReLU(inplace=True))
        self.predict = nn.Conv2d(channels, anchors * outputs, 3, 1, 1)

    def forward(self, x):
        y = self.predict(self.tower(x))
        return y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, self.outputs)


class TwoHeadDetector(nn.Module):
    def __init__(self, num_classes: int = 4, anchors: int = 3, neck: int = 32):
        super().__init__()
        self.stem = conv_bn_relu(3, 16, stride=2)                                # 1/2
        self.stage1 = nn.Sequential(conv_bn_relu(16, 24, stride=2), Residual(24))  # 1/4
        self.stage2 = nn.Sequential(conv_bn_relu(24, 48, stride=2), Residual(48))  # 1/8
        self.stage3 = nn.Sequential(conv_bn_relu(48, 64, stride=2), Residual(64))  # 1/16
        self.lateral2 = nn.Conv2d(48, neck, 1)
        self.lateral3 = nn.Conv2d(64, neck, 1)
        self.smooth2 = nn.Conv2d(neck, neck, 3, 1, 1)
        self.smooth3 = nn.Conv2d(neck, neck, 3, 1, 1)
        self.classify = Head(neck, anchors, num_classes)
        self.regress = Head(neck, anchors, 4)

    def forward(self, x):
        c2 = self.stage2(self.stage1(self.stem(x)))
        c3 = self.stage3(c2)
        p3 = self.lateral3(c3)
        p2 = self.lateral2(c2) + F.interpolate(p3, scale_factor=2.0, mode="nearest")
        levels = [self.smooth2(p2), self.smooth3(p3)]
        class_logits = torch.cat([self.classify(p) for p in levels], 1)
        box_deltas = torch.cat([self.regress(p) for p in levels], 1)
        return class_logits, box_deltas


def two_head_detector() -> TwoHeadDetector:
    """6 classes, 3 anchors per position, on a 64x64 image: 8x8 + 4x4 positions, 240 anchors."""
    return TwoHeadDetector(num_classes=6, anchors=3, neck=32)
