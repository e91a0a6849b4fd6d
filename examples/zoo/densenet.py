"""DenseNet-BC (Huang et al. 2017): every layer concatenates its k new channels onto its input.

Channel coupling exercised:
- concat with growing offsets: a dense block's output is ``[input, new_1, ..., new_L]`` and each later
  layer's BN/1x1 conv reads channels at those offsets, so every producer keeps its own channel range;
- transitions (BN -> ReLU -> 1x1 conv with compression 0.5 -> 2x2 avg-pool) that end a concat chain;
- two concat styles: the CIFAR model concatenates ``[x, new]`` inside each layer (a chain of 2-input
  concats), the ImageNet model keeps a Python list of features and concatenates the whole list before every
  layer (torchvision style: many concats reading the same tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChainedDenseLayer(nn.Module):
    """BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k), output ``cat([x, new], 1)``."""

    def __init__(self, in_channels: int, growth_rate: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, 4 * growth_rate, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.AvgPool2d(kernel_size=2, stride=2),
        )


class DenseNetCifar(nn.Module):
    def __init__(self, block_layers=(4, 4, 4), growth_rate: int = 12, reduction: float = 0.5, num_classes: int = 10):
        super().__init__()
        channels = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for index, num_layers in enumerate(block_layers):
            for _ in range(num_layers):
                stages.append(ChainedDenseLayer(channels, growth_rate))
                channels += growth_rate
            if index != len(block_layers) - 1:
                out_channels = int(channels * reduction)
                stages.append(Transition(channels, out_channels))
                channels = out_channels
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(channels)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x):
        out = self.features(self.conv1(x))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1)
        out = out.view(out.size(0), -1)
        return self.linear(out)


class ListDenseLayer(nn.Module):
    """torchvision ``_DenseLayer``: takes the list of previous features, returns only the k new channels."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, features):
        concatenated = torch.cat(features, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concatenated)))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int):
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = ListDenseLayer(in_channels + i * growth_rate, growth_rate, bn_size)

    def forward(self, init_features):
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNetImageNet(nn.Module):
    def __init__(self, block_config=(2, 2, 2, 2), growth_rate: int = 8, init_features: int = 16, bn_size: int = 4,
                 num_classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, init_features, 7, 2, 3, bias=False),
            nn.BatchNorm2d(init_features),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        channels = init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(num_layers, channels, growth_rate, bn_size))
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))


def densenet_bc_k12_cifar(num_classes: int = 10) -> nn.Module:
    """DenseNet-BC, growth 12, three blocks of 4 layers, compression 0.5 (24 -> 72 -> 36 -> 84 -> 42 -> 90)."""
    return DenseNetCifar((4, 4, 4), growth_rate=12, num_classes=num_classes)


def densenet_tiny_imagenet(num_classes: int = 1000) -> nn.Module:
    """torchvision-style DenseNet, growth 8, blocks (2, 2, 2, 2), 16 stem channels."""
    return DenseNetImageNet(num_classes=num_classes)
