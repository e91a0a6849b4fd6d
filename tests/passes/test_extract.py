"""Extraction equals the masked reference on hand-written tricky graphs (the zoo covers whole networks)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyncompile.pipeline import analyse_model
from dyncompile.verify import verify


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ShuffleUnit(nn.Module):
    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(nn.Conv2d(h, h, 1), nn.BatchNorm2d(h), nn.ReLU(),
                                    nn.Conv2d(h, h, 3, 1, 1, groups=h), nn.BatchNorm2d(h), nn.Conv2d(h, h, 1), nn.ReLU())

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat([x1, self.branch(x2)], 1)
        b, c, h, w = out.size()
        return out.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class Mixed(nn.Module):
    """Residual stage, two shuffle units, constant split sizes, a slice, flatten → linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1)
        self.blocks = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), ShuffleUnit(32), ShuffleUnit(32))
        self.head = nn.Conv2d(28, 24, 1)
        self.fc = nn.Linear(24 * 4 * 4, 10)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        a, b = torch.split(x, [12, 20], 1)
        x = torch.cat([b, a[:, 2:10]], 1)[:, :, ::4, ::4]
        x = F.relu(self.head(x))
        return self.fc(torch.flatten(x, 1))


def test_mixed_graph_sets_and_exactness():
    torch.manual_seed(0)
    model = Mixed().eval()
    dg = analyse_model(model, (1, 3, 32, 32), groups=8)
    names = {s.name: s for s in dg.sets}
    # the 2-group shuffle ties the stream with the shuffle branches' last convs: not an identity
    assert set(names["blocks.1.conv2"].producers) >= {"blocks.1.conv2", "blocks.1.shortcut.0",
                                                      "blocks.2.branch.5", "blocks.3.branch.5"}
    assert names["stem"].producers == ["stem", "blocks.0.conv2"]  # identity residual
    assert not names["fc"].free  # classifier outputs are never slimmed
    reports = verify(dg, [1.0, 0.75, 0.5, 0.25])
    for r in reports:
        assert r.ok, (r.width, r.problems)
    macs = [r.macs for r in reports]
    assert macs == sorted(macs, reverse=True) and macs[-1] < macs[0] / 3


@pytest.mark.parametrize("groups", [1, 3, 8])
def test_group_counts(groups):
    dg = analyse_model(Mixed().eval(), (1, 3, 32, 32), groups=groups)
    for s in dg.sets:
        assert sum(len(g) for g in s.groups) == len(s.classes)
        assert len(s.groups) <= groups
    assert all(r.ok for r in verify(dg, [1.0, 0.5]))


@pytest.mark.parametrize("multiple", [4, 8])
def test_group_multiple_sizes_every_group_but_the_last_to_the_multiple(multiple):
    """convert --group-multiple: sub-nets keep channel counts that fill a vector (a set of 12 with multiple 8:
    groups of 8 and 4), narrow sets get fewer groups, and every width still extracts exactly."""
    dg = analyse_model(Mixed().eval(), (1, 3, 32, 32), groups=8, group_multiple=multiple)
    assert dg.group_multiple == multiple
    for s in dg.free_sets:
        assert sum(len(g) for g in s.groups) == len(s.classes)
        assert all(len(g) % multiple == 0 for g in s.groups[:-1]), (s.name, s.group_channels)
        assert len(s.groups) <= max(1, -(-len(s.classes) // multiple))
    assert all(r.ok for r in verify(dg, [1.0, 0.5, 0.25]))


def test_group_multiple_must_be_positive():
    from dyncompile.convert import parse_group_multiple
    from dyncompile.errors import ConfigError

    assert parse_group_multiple("16") == 16
    assert parse_group_multiple("auto") in (4, 8, 16)  # this CPU's vector lanes (NEON, AVX2, AVX-512)
    for bad in ("0", "-8", "lots"):
        with pytest.raises(ConfigError, match="--group-multiple must be a positive number"):
            parse_group_multiple(bad)
