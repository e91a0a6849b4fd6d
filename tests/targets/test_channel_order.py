"""Searched sub-nets keep the best-ranked channel groups, anywhere in a tensor; the deployable stores each tensor in
the order that makes every sub-net's cut a prefix, so all sub-nets read one copy of the weights (issue 11)."""

import numpy as np
import pytest
import torch
from torch import nn

import dyncompile.runtime as runtime
from dyncompile.build import build
from dyncompile.deployable import read_manifest, write_deployable
from dyncompile.ir import reorder_groups, uniform_config
from dyncompile.passes.extract import extract_subnet, extract_with_indices
from dyncompile.pipeline import analyse_model
from dyncompile.targets.channel_order import ChannelOrder, _dim_order, _output_changes, plan_channel_order
from dyncompile.targets.relax_import import import_subnet


class _ResidualFlattenNet(nn.Module):
    """A residual add (two producers in one set) and a flatten into the classifier (one channel, many inputs)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        x = self.stem(x)
        x = (self.bn(self.conv(x)) + x).relu()
        return self.fc(self.down(x).flatten(1))


def _searched_like():
    """The net with its groups in a random rank order, three nested sub-nets, and per sub-net BN statistics,
    as a search leaves them."""
    torch.manual_seed(0)
    model = _ResidualFlattenNet().eval()
    dg = analyse_model(model, (1, 1, 8, 8), groups=4)
    g = torch.Generator().manual_seed(3)
    reorder_groups(dg, {s.name: torch.randperm(len(s.groups), generator=g).tolist() for s in dg.free_sets})
    configs = {name: uniform_config(dg, w) for name, w in (("w100", 1.0), ("w50", 0.5), ("w25", 0.25))}
    own = {name: {k: torch.rand(v.shape, generator=g) + 0.5 for k, v in dg.gm.state_dict().items()
                  if k.endswith(("running_mean", "running_var"))} for name in configs}
    return dg, configs, own


def test_each_dim_is_stored_smallest_cut_first_so_every_cut_is_a_prefix():
    cuts = [np.array([5, 1]), np.array([1, 3, 5, 6]), None]
    order = _dim_order(cuts, 8)
    assert order.tolist() == [1, 5, 3, 6, 0, 2, 4, 7]
    position = np.argsort(order)
    for cut in cuts[:2]:
        assert sorted(position[cut].tolist()) == list(range(len(cut)))
    assert _dim_order([np.array([0, 1]), None], 4) is None  # already prefixes: stored as it is
    with pytest.raises(ValueError):
        _dim_order([np.array([0, 1]), np.array([1, 2, 3])], 4)  # not nested


def test_searched_subnets_read_prefixes_of_one_stored_copy_and_match_pytorch(tmp_path):
    dg, configs, own = _searched_like()
    _, before = import_subnet(dg, "w25", configs["w25"], own_tensors=own["w25"])
    assert any(not p.is_prefix() for p in before.parameters)  # the cuts a search leaves, as the model stores them
    result = build(dg, configs, target="cpu", own_tensors=own)
    assert result.channel_order is not None and not result.notes
    for record in result.subnets:
        shared = [p for p in record.parameters if not p.source.startswith("@")]
        assert shared and all(p.is_prefix() for p in shared), record.name
    out = write_deployable(tmp_path / "cpu", result, dg)
    stored = read_manifest(out).weights.tensors
    assert stored["conv.weight"].channel_order is not None  # the manifest says how the tensor was permuted
    model = runtime.load(out)
    x = torch.randn(1, 1, 8, 8)
    for name, config in configs.items():
        with torch.no_grad():
            expected = extract_subnet(dg.with_tensors(own[name]), config).eval()(x)
        assert torch.allclose(model.run(x, subnet=name), expected, atol=1e-5, rtol=0), name
    held = {t.data_ptr(): t.numel() * 4 for name in model.names for t in model.weights_of(name)}
    full_bytes = sum(t.numel() * t.element_size() for t in dg.gm.state_dict().values() if t.is_floating_point())
    own_bytes = sum(t.numel() * 4 for tensors in own.values() for t in tensors.values())
    assert sum(held.values()) <= full_bytes + own_bytes  # without the order: each sub-net's own copies on top


def test_an_order_that_would_change_a_subnet_is_found_by_running_it():
    """The plan's guard: a permutation applied to one tensor and not to the tensors tied to it changes the
    output, and running the sub-net in PyTorch says so (a graph that reads channels by position would)."""
    dg, configs, _ = _searched_like()
    order, why = plan_channel_order(dg, configs)
    assert order is not None and why is None
    _, recipes = extract_with_indices(dg, configs["w100"])
    assert _output_changes(dg, configs["w100"], recipes, order) is None
    lopsided = ChannelOrder({"conv.weight": (np.array([1, 0, 2, 3, 4, 5, 6, 7]), None, None, None)})
    assert "outputs differ" in _output_changes(dg, configs["w100"], recipes, lopsided)


def test_uniform_widths_are_stored_as_the_model_has_them():
    torch.manual_seed(0)
    dg = analyse_model(_ResidualFlattenNet().eval(), (1, 1, 8, 8), groups=4)
    configs = {"w100": uniform_config(dg, 1.0), "w50": uniform_config(dg, 0.5)}
    assert plan_channel_order(dg, configs) == (None, None)



def test_a_cut_by_position_keeps_the_models_order_and_says_why(monkeypatch):
    """A tensor a layer rule cuts by position (no index list per dim; `test_cpu_build` builds a real one) cannot
    follow a new order: the plan gives up with one line, and the build stores the weights as the model has them."""
    import dyncompile.targets.channel_order as channel_order

    dg, configs, _ = _searched_like()
    recipes = {name: extract_with_indices(dg, config)[1] for name, config in configs.items()}
    recipes["w50"]["fc.weight"] = None  # what extract_with_indices(allow_non_slices=True) gives for such a cut
    by_config = {tuple(sorted(c.items())): recipes[name] for name, c in configs.items()}
    monkeypatch.setattr(channel_order, "extract_with_indices",
                        lambda dg, config, **kw: (None, by_config[tuple(sorted(config.items()))]))
    order, why = plan_channel_order(dg, configs)
    assert order is None and why == "sub-net 'w50' cuts 'fc.weight' by position: weights stored in the model's order"
