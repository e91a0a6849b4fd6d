"""Pass `lift_functional_layers`: functional calls on the model's tensors become layers, or stay opaque with a reason."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from checks import assert_verifies, sets_by_producer
from dyncompile.errors import WorkspaceError
from dyncompile.graph_io import load_graph_module, save_graph_module
from dyncompile.ir import OPAQUE, uniform_config
from dyncompile.layers import ExprConv2d
from dyncompile.passes.extract import extract_subnet
from dyncompile.passes.functional import lift_functional_layers
from dyncompile.passes.rewrite import convert_to_slimmable, set_subnet
from dyncompile.passes.trace import trace
from dyncompile.pipeline import analyse_model
from dyncompile.search.rank import NoiseScales, l1_scores
from dyncompile.search.subnets import SharedSubnets
from dyncompile.zoo.functional_layers import BlurPool2d

SHAPE = (1, 3, 8, 8)


class MaskedConv(nn.Conv2d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", (torch.rand(self.weight.shape) > 0.4).float())

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BNAct(nn.BatchNorm2d):
    def __init__(self, n, training_arg=None):
        super().__init__(n)
        self.act = nn.ReLU()
        self.training_arg = training_arg

    def forward(self, x):
        training = self.training if self.training_arg is None else self.training_arg
        return self.act(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training,
                                     self.momentum, self.eps))


class StdConv(nn.Conv2d):
    """Weight standardisation: mean and std over each filter are not element-wise, so slicing does not commute."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class Net(nn.Module):
    def __init__(self, conv=MaskedConv, norm=BNAct):
        super().__init__()
        self.c1 = conv(3, 8, 3, padding=1)
        self.n1 = norm(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.c2(self.n1(self.c1(x)))
        return self.head(x.mean((2, 3)))


def _modules(dg):
    return {n.target: dg.gm.get_submodule(n.target) for n in dg.gm.graph.nodes if n.op == "call_module"}


def _opaque(dg):
    return [n.meta[OPAQUE] for n in dg.gm.graph.nodes if OPAQUE in n.meta]


def test_masked_conv_subclass_becomes_a_layer_with_the_same_tensors():
    torch.manual_seed(0)
    model = Net().eval()
    dg = lift_functional_layers(trace(model, SHAPE))
    modules = _modules(dg)
    assert type(modules["c1"]) is ExprConv2d and modules["c1"].weight_expression == ["mul", "weight", "mask"]
    assert modules["c1"].weight is model.c1.weight and modules["c1"].mask is model.c1.mask
    assert type(modules["n1.batch_norm"]) is nn.BatchNorm2d and modules["n1.batch_norm"].weight is model.n1.weight
    assert {"c1.weight", "c1.mask", "c1.bias"} <= set(dg.gm.state_dict())  # names kept where the owner is whole
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(dg.gm(x), model(x))


def test_lifted_layers_are_slimmed_and_verify():
    torch.manual_seed(0)
    dg = analyse_model(Net().eval(), SHAPE, groups=4)
    assert sets_by_producer(dg)["c1"].free and not _opaque(dg)
    assert_verifies(dg)


def test_extracted_mask_is_cut_with_the_weight():
    torch.manual_seed(0)
    dg = analyse_model(Net().eval(), SHAPE, groups=4)
    sub = extract_subnet(dg, uniform_config(dg, 0.5))
    full, cut = dg.gm.get_submodule("c1"), sub.get_submodule("c1")
    kept = [int(i) for i in range(8) if any(torch.equal(cut.weight[j], full.weight[i]) for j in range(4))]
    assert len(kept) == 4 and torch.equal(cut.mask, full.mask[kept])
    assert torch.equal(cut.effective_weight(), full.effective_weight()[kept])


def test_masked_weights_stay_masked_in_training():
    """The mask is applied in forward: a masked weight gets no gradient, so fine-tuning cannot revive it."""
    torch.manual_seed(0)
    dg = analyse_model(Net().eval(), SHAPE, groups=4)
    model = convert_to_slimmable(dg).train()
    set_subnet(model, dg, uniform_config(dg, 0.5))
    model(torch.randn(4, 3, 8, 8)).square().sum().backward()
    conv = model.get_submodule("c1")
    assert conv.weight.grad.abs().sum() > 0
    assert torch.equal(conv.weight.grad[conv.mask == 0], torch.zeros(int((conv.mask == 0).sum())))


def test_batch_norm_with_batch_statistics_in_eval_stays_opaque():
    model = Net(norm=lambda n: BNAct(n, training_arg=True)).eval()
    dg = analyse_model(model, SHAPE, groups=4)
    assert any("batch statistics even in eval mode" in why for why in _opaque(dg))
    assert any("batch statistics" in why for why in dg.fixed_reasons)
    assert not sets_by_producer(dg)["c1"].free


def test_standardised_weight_stays_opaque_with_a_reason():
    dg = analyse_model(Net(conv=StdConv).eval(), SHAPE, groups=4)
    assert any("not element-wise" in why for why in _opaque(dg)), _opaque(dg)
    assert "c1" not in sets_by_producer(dg)  # no layer: the call's channels are fixed, not a set
    assert_verifies(dg)


class RuntimeStride(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, x.shape[-1] // 4, self.padding)


def test_stride_computed_at_run_time_stays_opaque():
    dg = lift_functional_layers(trace(Net(conv=RuntimeStride).eval(), SHAPE))
    assert any("stride is computed at run time" in why for why in _opaque(dg)), _opaque(dg)


class SharedWeights(nn.Module):
    """One weight used by two F.conv2d calls: lifting either would cut it twice, inconsistently."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.weight = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(F.conv2d(F.relu(F.conv2d(x, self.weight, padding=1)), self.weight, padding=1))


def test_shared_weight_stays_opaque():
    dg = analyse_model(SharedWeights().eval(), SHAPE, groups=4)
    assert len([why for why in _opaque(dg) if "also used" in why]) == 2
    assert not any(s.free for s in dg.sets)
    assert_verifies(dg)


class RootFunctional(nn.Module):
    """Parameters held by a module that also holds other layers: the lifted ones become new children."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.gn_w, self.gn_b = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))
        self.ln_w = nn.Parameter(torch.rand(8) + 0.5)
        self.w2 = nn.Parameter(torch.randn(16, 8) * 0.3)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = F.group_norm(F.conv2d(x, self.w1, None, 1, 1), 4, self.gn_w, self.gn_b)
        x = F.layer_norm(x, (8,), self.ln_w)  # over the width only: channels pass through
        return self.head(F.relu(F.linear(x.mean((2, 3)), self.w2)))


def test_root_parameters_move_into_new_children_and_verify():
    torch.manual_seed(0)
    model = RootFunctional().eval()
    dg = analyse_model(model, SHAPE, groups=4)
    kinds = {type(m) for m in _modules(dg).values()}
    assert {nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Linear} <= kinds and not _opaque(dg)
    assert "w1" not in dict(dg.gm.named_parameters())  # moved, not duplicated
    conv_set = sets_by_producer(dg)["conv2d"]
    assert conv_set.free and len(conv_set.classes) == 4  # GroupNorm(4) ties its groups of 2 channels
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(dg.gm(x), model(x))
    assert_verifies(dg)


def test_lifted_expression_layer_round_trips_through_a_workspace_graph(tmp_path):
    torch.manual_seed(0)
    dg = lift_functional_layers(trace(Net().eval(), SHAPE))
    save_graph_module(dg.gm, tmp_path)
    loaded = load_graph_module(tmp_path)
    x = torch.randn(2, 3, 8, 8)
    assert type(loaded.get_submodule("c1")) is ExprConv2d
    assert torch.equal(loaded(x), dg.gm(x))


def test_layer_norm_across_channels_fixes_them_with_a_reason():
    class Channelwise(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.norm(self.conv(x).mean((2, 3))))

    dg = analyse_model(Channelwise().eval(), SHAPE, groups=4)
    assert not sets_by_producer(dg)["conv"].free
    assert "LayerNorm 'norm' normalises across channels" in sets_by_producer(dg)["conv"].fixed_reasons


def test_search_ranks_a_masked_conv_by_its_masked_weight():
    torch.manual_seed(0)
    model = Net().eval()
    model.c1.mask[:2] = 0  # the first two filters are pruned away entirely
    dg = analyse_model(model, SHAPE, groups=4)
    first_group = dg.set_by_name("c1").groups[0]
    assert l1_scores(dg, dg.gm)["c1"][0] == 0.0 and len(first_group) == 2


def test_shared_weight_training_keeps_the_mask_and_reaches_the_full_weight():
    """The search trains sub-nets on slices of the full weights: the mask is cut with them and stays applied."""
    torch.manual_seed(0)
    dg = analyse_model(Net().eval(), SHAPE, groups=4)
    config, x = uniform_config(dg, 0.5), torch.randn(2, 3, 8, 8)
    net = SharedSubnets(dg).eval()
    out = net(x, config)
    assert torch.allclose(out, extract_subnet(dg, config).eval()(x), atol=1e-6)
    out.square().sum().backward()
    full = dg.gm.get_submodule("c1")
    assert full.weight.grad.abs().sum() > 0 and not full.weight.grad[full.mask == 0].any()


class GainConv(MaskedConv):
    """A weight expression with a reused step, a number and a per-filter trainable gain (broadcast over a filter)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        w = self.weight * self.mask
        return F.conv2d(x, w + 0.5 * w * self.gain, self.bias, self.stride, self.padding)


def test_weight_expression_with_a_broadcast_operand_is_cut_along_its_own_dims():
    torch.manual_seed(0)
    model = Net(conv=GainConv).eval()
    dg = analyse_model(model, SHAPE, groups=4)
    conv = dg.gm.get_submodule("c1")
    assert type(conv) is ExprConv2d and conv.gain is model.c1.gain and not _opaque(dg)
    assert not [n for n in dg.gm.graph.nodes if n.op == "get_attr"], "the reused step and its tensors are gone"
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(dg.gm(x), model(x))
    cut = extract_subnet(dg, uniform_config(dg, 0.5)).get_submodule("c1")
    assert cut.gain.shape == (4, 1, 1, 1) and cut.mask.shape == cut.weight.shape == (4, 3, 3, 3)
    assert_verifies(dg)


def test_a_stored_weight_expression_reaches_only_its_own_operands(tmp_path):
    dg = lift_functional_layers(trace(Net().eval(), SHAPE))
    save_graph_module(dg.gm, tmp_path)
    path = tmp_path / "graph.json"
    stored = json.loads(path.read_text())
    stored["modules"]["c1"]["kwargs"]["weight_expression"] = ["mul", "weight", "__class__"]  # an edited file
    path.write_text(json.dumps(stored))
    with pytest.raises(WorkspaceError, match="not one of its operands"):
        load_graph_module(tmp_path)


class BlurNet(Net):
    def __init__(self):
        super().__init__()
        self.n1 = nn.Sequential(BNAct(8), BlurPool2d(8))  # timm-style: a fixed filter buffer as the weight


def test_a_fixed_filter_buffer_is_lifted_as_a_buffer_weight():
    torch.manual_seed(0)
    model = BlurNet().eval()
    dg = analyse_model(model, SHAPE, groups=4)
    blur = dg.gm.get_submodule("n1.1")
    assert type(blur) is ExprConv2d and "weight" in dict(blur.named_buffers()) and not _opaque(dg)
    assert sets_by_producer(dg)["c1"].free  # the depthwise blur passes the conv's channels on
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(dg.gm(x), model(x))
    cut = extract_subnet(dg, uniform_config(dg, 0.5)).get_submodule("n1.1")
    assert "weight" in dict(cut.named_buffers()) and cut.weight.shape == (4, 1, 3, 3)
    assert_verifies(dg)
    net = SharedSubnets(dg)  # shared-weight training and the noise ranking leave the fixed filter alone
    net(x, uniform_config(dg, 0.5)).sum().backward()
    assert "n1.1.weight" not in NoiseScales(dg).transform(dict(dg.gm.named_parameters()))


def test_a_buffer_weight_round_trips_through_a_workspace_graph(tmp_path):
    dg = lift_functional_layers(trace(BlurNet().eval(), SHAPE))
    save_graph_module(dg.gm, tmp_path)
    loaded = load_graph_module(tmp_path)
    x = torch.randn(2, 3, 8, 8)
    assert "weight" in dict(loaded.get_submodule("n1.1").named_buffers())
    assert torch.equal(loaded(x), dg.gm(x))
