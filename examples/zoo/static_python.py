"""CNNs whose Python reads shapes and flags: untraceable by torch.fx, yet static once the input shape is known.

One model per idiom that stops plain ``torch.fx.symbolic_trace``:
- ``shape_assert_cifar``: ``assert x.shape[1] % 2 == 0`` before a channel split, ``assert att.size(1) == 1``
  on a spatial-attention map, ``assert out.shape == x.shape`` before each residual add (the batch sizes of
  two tensors compared);
- ``enet_cifar``: ENet-style bottlenecks (Paszke et al. 2016). The downsampling bottleneck's shortcut is a
  max-pool whose missing channels are zeros, ``torch.zeros(b, c_extra, h, w, dtype=x.dtype,
  device=x.device)`` concatenated onto it, sized from ``x.shape``; the initial block concatenates a conv with
  a max-pool of the image; PReLU activations;
- ``multi_exit_cifar``: ``forward(self, x, only_last=True)`` returns the last stage's logits, or with
  ``only_last=False`` the logits of every stage (a Python flag, not a tensor);
- ``fractalnet_cifar``: FractalNet-style blocks (Larsson et al. 2017): columns of convs joined by their
  mean; the forward computes ``int(x.size(0) * 0.5)`` samples for global drop-path, which only a
  training-mode join uses (local and global drop-path).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


# ───────────────────────────── shape asserts ─────────────────────────────
class CheckedBasicBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = _conv_bn_relu(channels, channels)
        self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        assert out.shape == x.shape, f"residual shapes differ: {out.shape} vs {x.shape}"
        return torch.relu(out + x)


class HalfSplitBlock(nn.Module):
    """Keeps half the channels, transforms the other half (a ShuffleNet v2 unit without the shuffle)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(_conv_bn_relu(half, hidden),
                                    nn.Conv2d(hidden, half, 1, bias=False), nn.BatchNorm2d(half))

    def forward(self, x):
        assert x.dim() == 4, "expects N, C, H, W"
        assert x.shape[1] % 2 == 0, "the channel split needs an even channel count"
        keep, change = x.chunk(2, 1)
        return torch.cat([keep, torch.relu(self.branch(change))], 1)


class SpatialGate(nn.Module):
    """Multiplies every channel by one sigmoid attention map (an attention-gate: 1x1 conv to one channel)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x):
        att = self.conv(x)
        assert att.size(1) == 1, "one attention map for all channels"
        return x * torch.sigmoid(att)


class ShapeAssertNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = _conv_bn_relu(3, 32)
        self.block1 = CheckedBasicBlock(32)
        self.down = _conv_bn_relu(32, 64, 2)
        self.split = HalfSplitBlock(64, 48)
        self.gate = SpatialGate(64)
        self.block2 = CheckedBasicBlock(64)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        assert x.size(1) == 3, "RGB input"
        x = self.down(self.block1(self.stem(x)))
        x = self.block2(self.gate(self.split(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def shape_assert_cifar(num_classes: int = 10) -> nn.Module:
    return ShapeAssertNet(num_classes)


# ───────────────────────────── ENet: zero-padded shortcut ─────────────────────────────
class InitialBlock(nn.Module):
    """ENet's first block: a strided conv beside a max-pool of the image, concatenated."""

    def __init__(self, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(3, cout - 3, 3, 2, 1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.PReLU()

    def forward(self, x):
        return self.act(self.bn(torch.cat([self.conv(x), self.pool(x)], 1)))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand beside the shortcut. Downsampling: the reduce is a strided 2x2 conv,
    and the shortcut is a max-pool padded with zero channels up to the output width."""

    def __init__(self, cin: int, cout: int, downsample: bool = False, ratio: int = 4):
        super().__init__()
        mid = cin // ratio
        self.out_channels = cout
        self.downsample = downsample
        reduce = nn.Conv2d(cin, mid, 2, 2, bias=False) if downsample else nn.Conv2d(cin, mid, 1, bias=False)
        self.ext = nn.Sequential(
            reduce, nn.BatchNorm2d(mid), nn.PReLU(),
            nn.Conv2d(mid, mid, 3, 1, 1, bias=False), nn.BatchNorm2d(mid), nn.PReLU(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.pool = nn.MaxPool2d(2) if downsample else nn.Identity()
        self.act = nn.PReLU()

    def forward(self, x):
        main = self.pool(x)
        if self.downsample:
            b, c, h, w = main.shape
            pad = torch.zeros(b, self.out_channels - c, h, w, dtype=x.dtype, device=x.device)
            main = torch.cat([main, pad], 1)
        return self.act(main + self.ext(x))


class ENetEncoder(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.initial = InitialBlock(16)
        self.stage1 = nn.Sequential(Bottleneck(16, 64, downsample=True), Bottleneck(64, 64), Bottleneck(64, 64))
        self.stage2 = nn.Sequential(Bottleneck(64, 128, downsample=True), Bottleneck(128, 128))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.stage2(self.stage1(self.initial(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def enet_cifar(num_classes: int = 10) -> nn.Module:
    return ENetEncoder(num_classes)


# ───────────────────────────── a forward flag ─────────────────────────────
class MultiExitNet(nn.Module):
    """Three stages, each with a classifier; by default only the last one answers."""

    def __init__(self, num_classes: int = 10, widths=(24, 48, 96)):
        super().__init__()
        cins = (3,) + tuple(widths[:-1])
        self.stages = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(cin, cout, 1 if i == 0 else 2), _conv_bn_relu(cout, cout))
            for i, (cin, cout) in enumerate(zip(cins, widths)))
        self.heads = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)) for c in widths)

    def forward(self, x, only_last=True):
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        if only_last:
            return self.heads[-1](features[-1])
        return [head(f) for head, f in zip(self.heads, features)]


def multi_exit_cifar(num_classes: int = 10) -> nn.Module:
    return MultiExitNet(num_classes)


# ───────────────────────────── FractalNet: drop-path reads the batch size ─────────────────────────────
class FractalBlock(nn.Module):
    """f_1(z) = conv(z); f_{k+1}(z) = join(f_k(f_k(z)), conv(z)): `columns` columns of different depths."""

    def __init__(self, cin: int, cout: int, columns: int, local_drop: float = 0.15):
        super().__init__()
        self.shallow = _conv_bn_relu(cin, cout)
        self.local_drop = local_drop
        if columns > 1:
            self.deep_in = FractalBlock(cin, cout, columns - 1, local_drop)
            self.deep_out = FractalBlock(cout, cout, columns - 1, local_drop)
        else:
            self.deep_in = self.deep_out = None

    def forward(self, x, n_global: int = 0):
        if self.deep_in is None:
            return self.shallow(x)
        deep = self.deep_out(self.deep_in(x, n_global), n_global)
        return self.join([deep, self.shallow(x)], n_global)

    def join(self, paths, n_global: int):
        stacked = torch.stack(paths)  # paths, N, C, H, W
        if not self.training:
            return stacked.mean(0)
        # Drop-path: each sample keeps a random non-empty subset of the paths; the first n_global samples
        # keep exactly one (global drop-path, a whole column at a time).
        count, batch = stacked.shape[:2]
        keep = torch.rand(count, batch, device=stacked.device) > self.local_drop
        keep[:, :n_global] = False
        chosen = torch.randint(count, (batch,), device=stacked.device)
        empty = ~keep.any(0)
        keep[chosen[empty], empty.nonzero().flatten()] = True
        keep[chosen[:n_global], torch.arange(n_global, device=stacked.device)] = True
        weights = keep.to(stacked.dtype).view(count, batch, 1, 1, 1)
        return (stacked * weights).sum(0) / weights.sum(0)


class FractalNet(nn.Module):
    def __init__(self, num_classes: int = 10, widths=(32, 64), columns: int = 3, global_ratio: float = 0.5):
        super().__init__()
        self.global_ratio = global_ratio
        cins = (3,) + tuple(widths[:-1])
        self.blocks = nn.ModuleList(FractalBlock(cin, cout, columns) for cin, cout in zip(cins, widths))
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        n_global = int(x.size(0) * self.global_ratio)  # samples trained with global drop-path
        for block in self.blocks:
            x = self.pool(block(x, n_global))
        return self.fc(x.mean((2, 3)))


def fractalnet_cifar(num_classes: int = 10) -> nn.Module:
    return FractalNet(num_classes)
