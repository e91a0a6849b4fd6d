"""The layer-rule registry: layer types added through it convert, verify exactly and slim.

Each network is checked the way `dyncompile verify` checks a user's model: at widths 1/0.75/0.5/0.25 the
converted model is exact at full width and every extracted sub-net equals the masked model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyncompile.layer_rules import (ConvRule, ConvTransposeRule, LayerRule, layer_rule_for, register_layer_rule,
                                    unregister_layer_rule)
from dyncompile.passes.extract import extract_subnet
from dyncompile.passes.rewrite import convert_to_slimmable
from dyncompile.pipeline import analyse_model
from dyncompile.search.rank import producer_groups

from tests.passes.checks import assert_verifies, sets_by_producer


class Decoder(nn.Module):
    """conv → BN → ReLU → ConvTranspose2d (upsampling) → BN → conv, and a grouped transposed conv."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.encode = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.up = nn.ConvTranspose2d(16, 12, 4, stride=2, padding=1, groups=groups)
        self.bn2 = nn.BatchNorm2d(12)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.head(self.bn2(self.up(F.relu(self.bn1(self.encode(x))))))


@pytest.mark.parametrize("groups, mode", [(1, "auto"), (4, "group"), (4, "position")])
def test_transposed_conv_decoder_slims_and_verifies(groups, mode):
    torch.manual_seed(0)
    dg = analyse_model(Decoder(groups).eval(), (1, 3, 16, 16), groups=4, grouped_conv_mode=mode)
    sets = sets_by_producer(dg)
    assert sets["encode"].free and sets["up"].free
    assert dg.gm.get_submodule("up").weight.shape == (16, 12 // groups, 4, 4)  # [in, out/groups, k, k]
    if mode == "group":
        assert sets["encode"] is sets["up"], "a grouped transposed conv ties each input group to its output group"
        assert len(sets["up"].classes) == groups
    elif mode == "position":
        assert sets["encode"] is not sets["up"] and len(sets["up"].classes) == 12 // groups
    assert_verifies(dg)
    sub = extract_subnet(dg, {s.name: 1 for s in dg.free_sets})
    up = sub.get_submodule("up")
    assert type(up) is nn.ConvTranspose2d and up.out_channels < 12 and up.in_channels < 16
    assert type(convert_to_slimmable(dg).get_submodule("up")).__name__ == "SlimConvTranspose2d"
    # the rankings read each output channel's filter as weight[c]: a transposed conv's weight is not laid out so
    assert "up" not in producer_groups(dg) and "encode" in producer_groups(dg)


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.act = nn.PReLU(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.conv2(self.act(self.norm(self.conv1(x)))).mean((2, 3)))


def test_group_norm_network_slims_whole_norm_groups_and_verifies():
    torch.manual_seed(0)
    dg = analyse_model(GroupNormNet().eval(), (1, 3, 8, 8), groups=4)
    conv1 = sets_by_producer(dg)["conv1"]
    assert conv1.free and len(conv1.classes) == 4, "each GroupNorm group of 4 channels is one class"
    assert_verifies(dg)
    norm = extract_subnet(dg, {s.name: 1 for s in dg.free_sets}).get_submodule("norm")
    assert (norm.num_groups, norm.num_channels) == (1, 4)


class ScaledConv2d(nn.Module):
    """A user's layer: its own weight, a per-output-channel scale, and a forward calling F.conv2d."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = cin, cout, 1
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)
        self.scale = nn.Parameter(torch.rand(cout) + 0.5)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, padding=1) * self.scale[:, None, None]


class ScaledConvRule(ConvRule):
    def extract(self, module, in_idx, out_idx):
        new = super().extract(module, in_idx, out_idx)
        new.scale = nn.Parameter(module.scale.detach()[out_idx].clone())
        return new


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.scaled = ScaledConv2d(8, 16)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.scaled(F.relu(self.stem(x))))).mean((2, 3)))


@pytest.fixture
def scaled_conv_rule():
    register_layer_rule(ScaledConv2d, ScaledConvRule())
    try:
        yield
    finally:
        unregister_layer_rule(ScaledConv2d)


def test_a_user_layer_without_a_rule_is_kept_whole():
    dg = analyse_model(UserNet().eval(), (1, 3, 8, 8), groups=4, leaf_modules=("scaled",))
    assert layer_rule_for(dg.gm.get_submodule("scaled")) is None
    sets = sets_by_producer(dg)
    assert not sets["stem"].free and any("module 'scaled'" in why for why in sets["stem"].fixed_reasons)
    assert "scaled" not in sets  # not a producer: its channels are not the analysis' to drop
    assert_verifies(dg)


def test_a_registered_user_layer_slims_and_verifies(scaled_conv_rule):
    torch.manual_seed(0)
    dg = analyse_model(UserNet().eval(), (1, 3, 8, 8), groups=4, leaf_modules=("scaled",))
    sets = sets_by_producer(dg)
    assert sets["stem"].free and sets["scaled"].free
    assert_verifies(dg)
    scaled = extract_subnet(dg, {s.name: 1 for s in dg.free_sets}).get_submodule("scaled")
    assert type(scaled) is ScaledConv2d and scaled.weight.shape[:2] == scaled.scale.shape + (2,)


class PadConv(nn.Conv2d):
    """timm's Conv2dSame pattern: a registered class's subclass with its own forward."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


def test_lookup_walks_the_mro_only_up_to_the_forward_that_runs():
    class Plain(nn.Conv2d):
        pass

    assert isinstance(layer_rule_for(nn.Conv2d(3, 3, 1)), ConvRule)
    assert layer_rule_for(Plain(3, 3, 1)) is layer_rule_for(nn.Conv2d(3, 3, 1))
    assert isinstance(layer_rule_for(nn.ConvTranspose3d(3, 3, 1)), ConvTransposeRule)
    assert layer_rule_for(PadConv(3, 3, 3)) is None  # its own forward: opaque
    assert layer_rule_for(nn.PReLU()) is None  # one weight: an element-wise activation
    assert layer_rule_for(nn.PReLU(4)) is not None
    assert layer_rule_for(nn.ReLU()) is None  # op handlers, not layer rules
    with pytest.raises(TypeError):
        register_layer_rule(PadConv, object())
    with pytest.raises(TypeError):
        register_layer_rule(F.conv2d, LayerRule())


def test_a_graph_slimmed_by_a_rule_since_unregistered_is_one_line_not_a_crash():
    """A user's rule must be registered wherever the converted graph is used: without it, extraction and the
    rankings say so in one line instead of failing on a missing attribute or cutting nothing."""
    from dyncompile.errors import ConfigError
    from dyncompile.search.rank import producer_groups

    register_layer_rule(ScaledConv2d, ScaledConvRule())
    try:
        dg = analyse_model(UserNet().eval(), (1, 3, 8, 8), groups=4, leaf_modules=("scaled",))
    finally:
        unregister_layer_rule(ScaledConv2d)
    with pytest.raises(ConfigError, match="no layer rule is registered for layer 'scaled' .ScaledConv2d."):
        extract_subnet(dg, {s.name: 1 for s in dg.free_sets})
    with pytest.raises(ConfigError, match="register_layer_rule"):
        producer_groups(dg)
