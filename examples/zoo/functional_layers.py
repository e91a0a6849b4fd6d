"""Layers written as functional calls in a subclass's own forward (pruned checkpoints, timm-style layers).

Channel coupling exercised (fx traces into these forwards; dyncompile lifts each call into the layer it is):
- ``MaskedConv2d(nn.Conv2d)``: ``F.conv2d(x, self.weight * self.mask, self.bias, self.stride, …)`` with a fixed
  0/1 pruning mask buffer, in a DenseNet-BC (the mask is cut with the weight, and stays applied);
- ``BatchNormAct2d(nn.BatchNorm2d)``: ``F.batch_norm(...)`` then the activation child module, timm style
  (training-mode statistics bookkeeping in Python, skipped in eval);
- ``GroupNormAct(nn.GroupNorm)``: ``F.group_norm`` then an activation;
- ``LayerNorm2d(nn.LayerNorm)``: channels-first ``F.layer_norm`` over permuted channels (ConvNeXt/timm head
  norm; it normalises across channels, so the set feeding it is kept whole);
- ``LinearClassifier(nn.Linear)``: ``F.linear(x, self.weight, self.bias)``;
- ``BlurPool2d``: anti-aliased downsampling (TResNet style), a depthwise ``F.conv2d`` whose weight is a fixed
  binomial filter buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaskedConv2d(nn.Conv2d):
    """A magnitude-pruned conv: the smallest `sparsity` of the weights are masked out by a fixed buffer."""

    def __init__(self, *args, sparsity: float = 0.3, **kwargs):
        super().__init__(*args, **kwargs)
        magnitude = self.weight.detach().abs().flatten()
        threshold = magnitude.kthvalue(max(1, int(sparsity * magnitude.numel()))).values
        self.register_buffer("mask", (self.weight.detach().abs() > threshold).float())

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding, self.dilation, self.groups)


class MaskedDenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth_rate: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = MaskedConv2d(in_channels, 4 * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = MaskedConv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return torch.cat([x, out], 1)


class MaskedDenseNet(nn.Module):
    def __init__(self, block_layers=(3, 3, 3), growth_rate: int = 12, num_classes: int = 10):
        super().__init__()
        channels = 2 * growth_rate
        layers: list[nn.Module] = [MaskedConv2d(3, channels, 3, padding=1, bias=False)]
        for index, count in enumerate(block_layers):
            for _ in range(count):
                layers.append(MaskedDenseLayer(channels, growth_rate))
                channels += growth_rate
            if index != len(block_layers) - 1:
                layers += [nn.BatchNorm2d(channels), nn.ReLU(),
                           MaskedConv2d(channels, channels // 2, 1, bias=False), nn.AvgPool2d(2)]
                channels //= 2
        self.features = nn.Sequential(*layers)
        self.norm = nn.BatchNorm2d(channels)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.norm(self.features(x))), 1)
        return self.classifier(torch.flatten(x, 1))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d, reduced: F.batch_norm on the module's own tensors, then the activation."""

    def __init__(self, num_features: int, act: bool = True):
        super().__init__(num_features)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training or not self.track_running_stats, momentum, self.eps)
        return self.act(x)


class GroupNormAct(nn.GroupNorm):
    def forward(self, x):
        return F.silu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (timm's LayerNorm2d)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class LinearClassifier(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class BlurPool2d(nn.Module):
    """Stride-2 anti-aliasing: each channel is blurred by a fixed 3x3 binomial filter, then subsampled."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        taps = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", (taps[:, None] * taps[None, :] / 16).expand(channels, 1, 3, 3).clone())

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=self.channels)


class FunctionalBlock(nn.Module):
    """conv → norm-act (→ blur-pool where it downsamples) → conv → norm, plus a (projected) shortcut, then SiLU."""

    def __init__(self, in_channels: int, channels: int, stride: int, group_norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.norm1 = GroupNormAct(4, channels) if group_norm else BatchNormAct2d(channels)
        self.blur = BlurPool2d(channels) if stride == 2 else nn.Identity()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm2 = BatchNormAct2d(channels, act=False)
        self.shortcut = (nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                       BatchNormAct2d(channels, act=False))
                         if stride != 1 or in_channels != channels else nn.Identity())

    def forward(self, x):
        return F.silu(self.norm2(self.conv2(self.blur(self.norm1(self.conv1(x))))) + self.shortcut(x))


class TimmStyleNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), BatchNormAct2d(widths[0]))
        blocks, in_channels = [], widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks += [FunctionalBlock(in_channels, width, stride, group_norm=index == 1),
                       FunctionalBlock(width, width, 1, group_norm=index == 1)]
            in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head_conv = nn.Conv2d(in_channels, 2 * in_channels, 1, bias=False)
        self.head_norm = LayerNorm2d(2 * in_channels)
        self.classifier = LinearClassifier(2 * in_channels, num_classes)

    def forward(self, x):
        x = self.head_norm(self.head_conv(self.blocks(self.stem(x))))
        return self.classifier(x.mean((2, 3)))


def masked_densenet_cifar(num_classes: int = 10) -> nn.Module:
    """DenseNet-BC (3 blocks of 3 layers, k=12) with 30%-magnitude-pruned MaskedConv2d layers."""
    return MaskedDenseNet(num_classes=num_classes)


def timm_style_cifar(num_classes: int = 10) -> nn.Module:
    """A small timm-style ResNet: BatchNormAct2d / GroupNormAct norms, blur-pool downsampling, LayerNorm2d head
    norm, F.linear head."""
    return TimmStyleNet(num_classes=num_classes)
