"""The coupling analysis on the exact cases the issue names, each checked precisely and then end to end.

The best public pruning tool crashes on shuffle→chunk, on slice+concat and on constant split sizes, and treats a
2-group channel shuffle as an identity (a wrong network that still runs). Each case is pinned down here.
"""

import torch
import torch.nn.functional as F
from torch import nn

from dyncompile.ir import LABELS
from dyncompile.pipeline import analyse_model

from tests.passes.checks import assert_verifies, sets_by_producer


class TwoGroupShuffle(nn.Module):
    """a and b are independent convs; after a 2-group shuffle, channel j of a sits next to channel j of b."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(self.head(y).mean((2, 3)))


def test_two_group_shuffle_is_not_an_identity():
    dg = analyse_model(TwoGroupShuffle().eval(), (1, 3, 8, 8), groups=4)
    sets = sets_by_producer(dg)
    assert sets["a"] is sets["b"], "the shuffle ties channel j of a with channel j of b"
    assert len(sets["a"].classes) == 8
    assert_verifies(dg)


class ShuffleThenChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        n, c, h, w = x.size()
        x = x.view(n, 4, c // 4, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        left, right = x.chunk(2, dim=1)
        x = torch.cat([left, F.relu(self.branch(right))], 1)
        return self.fc(self.head(x).mean((2, 3)))


def test_shuffle_followed_by_chunk():
    dg = analyse_model(ShuffleThenChunk().eval(), (1, 3, 8, 8), groups=4)
    stem = sets_by_producer(dg)["stem"]
    # viewing 16 channels as (4, 4) ties channel position j across the 4 groups: 4 classes of 4 channels;
    # after the shuffle and chunk each half holds 2 classes, so the first group must hold one of each half.
    assert len(stem.classes) == 4
    assert stem.groups[0] == sorted(stem.groups[0], key=stem.classes.index) and len(stem.groups[0]) == 2
    assert_verifies(dg)


class SliceConcat(nn.Module):
    """Dual-path style: the first d channels join a residual sum, the rest are concatenated densely."""

    def __init__(self, d=12, k=6):
        super().__init__()
        self.d = d
        self.stem = nn.Conv2d(3, d + k, 3, padding=1)
        self.block = nn.Conv2d(d + k, d + k, 3, padding=1)
        self.head = nn.Conv2d(d + 2 * k, 10, 1)
        self.fc = nn.Linear(10, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.block(x)
        residual = x[:, : self.d] + y[:, : self.d]
        dense = torch.cat([x[:, self.d:], y[:, self.d:]], 1)
        return self.fc(F.relu(self.head(torch.cat([residual, dense], 1))).mean((2, 3)))


def test_slice_plus_concat():
    dg = analyse_model(SliceConcat().eval(), (1, 3, 8, 8), groups=3)
    sets = sets_by_producer(dg)
    assert sets["stem"] is sets["block"], "the residual slice ties the first d channels of both convs"
    # the dense parts stay independent: 12 shared + 6 + 6 own classes
    assert len(sets["stem"].classes) == 12 + 6 + 6
    assert_verifies(dg)


class ConstantSplits(nn.Module):
    """Half InstanceNorm / half BatchNorm with split sizes written as constants, then a mixed-kernel split."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(12, affine=True)
        self.bnorm = nn.BatchNorm2d(20)
        self.dw3 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.dw5 = nn.Conv2d(16, 16, 5, padding=2, groups=16)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stem(x)
        a, b = torch.split(x, [12, 20], dim=1)
        x = F.relu(torch.cat([self.inorm(a), self.bnorm(b)], 1))
        p, q = torch.split(x, [16, 16], 1)
        x = torch.cat([self.dw3(p), self.dw5(q)], 1)
        return self.fc(x.mean((2, 3)))


def test_constant_split_sizes():
    dg = analyse_model(ConstantSplits().eval(), (1, 3, 8, 8), groups=8)
    sets = sets_by_producer(dg)
    assert sets["stem"] is sets["dw3"] is sets["dw5"]  # depthwise convs tie in and out per channel
    assert len(sets["stem"].classes) == 32
    assert_verifies(dg)


class IndexSelectFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("order", torch.tensor([7, 0, 6, 1, 5, 2, 4, 3]))
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        x = torch.index_select(self.conv(x), 1, self.order)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))


def test_index_select_and_flatten_to_linear():
    dg = analyse_model(IndexSelectFlatten().eval(), (1, 3, 8, 8), groups=4)
    conv = sets_by_producer(dg)["conv"]
    assert conv.free and len(conv.classes) == 8
    fc_input = next(n for n in dg.gm.graph.nodes if n.target == "fc").args[0].meta[LABELS]
    assert fc_input.numel() == 32 and len(fc_input.unique()) == 8  # each channel spans its 4 spatial features
    assert_verifies(dg)


class SoftmaxOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.other = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        attention = torch.softmax(self.conv(x), dim=1)  # normalises across channels: cannot drop any
        return self.fc((attention * F.relu(self.other(x))).mean((2, 3)))


def test_what_cannot_be_proven_safe_is_fixed_and_reported():
    dg = analyse_model(SoftmaxOverChannels().eval(), (1, 3, 8, 8), groups=4)
    conv = sets_by_producer(dg)["conv"]
    assert not conv.free and conv.fixed_channels == 8
    assert any("softmax" in why and "across channels" in why for why in conv.fixed_reasons)
    other = sets_by_producer(dg)["other"]  # multiplied position-wise with the fixed attention: tied to it
    assert not other.free and any("tied by mul" in why for why in other.fixed_reasons)
    assert_verifies(dg)


class OneChannelSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(1, 2)

    def forward(self, x):
        return self.fc(self.conv(x)[:, 3:4].mean((2, 3)))


def test_one_channel_slice_keeps_its_channel():
    """Found by the random-graph property test: a one-channel tensor must never be emptied."""
    dg = analyse_model(OneChannelSlice().eval(), (1, 3, 4, 4), groups=2)
    conv = sets_by_producer(dg)["conv"]
    channel3 = int(next(n for n in dg.gm.graph.nodes if n.target == "conv").meta[LABELS].flatten()[3])
    assert channel3 in conv.groups[0], "the only channel the classifier reads is in the group every sub-net keeps"
    assert_verifies(dg)


class OpShuffles(nn.Module):
    """channel_shuffle / ChannelShuffle / pixel_shuffle take their factor as an argument, not from the tensor."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.shuffle = nn.ChannelShuffle(3)
        self.b = nn.Conv2d(6, 16, 1)
        self.c = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = self.shuffle(F.channel_shuffle(self.a(x), 2))
        y = F.pixel_shuffle(self.b(y), 2)
        return self.fc(self.c(y).mean((2, 3)))


def test_factor_taking_shuffles_extract_exactly():
    """Found by the random-graph property test: the op is copied verbatim, so kept channels must fit it."""
    dg = analyse_model(OpShuffles().eval(), (1, 3, 4, 4), groups=4)
    sets = sets_by_producer(dg)
    assert len(sets["a"].classes) == 1  # shuffles by 2 then 3 over 6 channels tie every position together
    assert len(sets["b"].classes) == 4  # pixel_shuffle(2): blocks of 4 channels become one output channel
    assert_verifies(dg)


class BNReLU(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: a BN subclass whose own forward adds an activation."""

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps))


class PadConv(nn.Conv2d):
    """timm's Conv2dSame pattern: a conv subclass that pads inside its own forward."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


class SubclassLeaves(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = BNReLU(16)
        self.conv2 = PadConv(16, 16, 3)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.conv2(self.bn(self.conv1(x))).mean((2, 3)))


def test_leaf_subclass_with_its_own_forward_is_not_taken_for_the_torch_layer():
    """Found on timm models (docs/public-zoos.md, F1): such a leaf is opaque, so its channels stay whole."""
    dg = analyse_model(SubclassLeaves().eval(), (1, 3, 8, 8), groups=4, leaf_modules=("bn", "conv2"))
    sets = sets_by_producer(dg)
    assert not sets["conv1"].free and any("module 'bn'" in why for why in sets["conv1"].fixed_reasons)
    assert_verifies(dg)
