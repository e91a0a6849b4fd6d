"""graph_io: GraphModules round-trip through JSON + weights-only tensors, and nothing else loads."""

from __future__ import annotations

import json
import math
import operator
import warnings
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dyncompile import graph_io
from dyncompile.errors import WorkspaceError
from dyncompile.graph_io import load_graph_module, register_safe_module, save_graph_module

# --------------------------------------------------------------------------- models


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so eval-mode BN matters."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.num_batches_tracked.fill_(7)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNetTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(BasicBlock(8, 16, 2))
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer1(self.stem(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.drop(x))


class ShuffleBlock(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half),
        )

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        c, d = torch.chunk(x, 2, 1)
        out = torch.cat((a, self.branch(b)), dim=1) + torch.cat([d, c], 1)
        n, ch, h, w = out.size()
        out = out.view(n, 2, ch // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return out


class SplitSliceSelect(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("index", torch.tensor([3, 0, 7, 7, 1]))
        self.conv = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        a, b = torch.split(x, [4, 12], 1)
        s = x[:, :8]
        picked = torch.index_select(x, 1, self.index)
        picked = picked.to(dtype=x.dtype, memory_format=torch.contiguous_format)
        a = torch.clamp(a, min=-math.inf, max=math.inf)
        return torch.cat([a + self.conv(b), s[:, 2:6], picked[:, ::2, ...]], dim=1)


class SEBlock(nn.Module):
    def __init__(self, c: int = 16, r: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s), inplace=True)))
        return x * s


class LayerScaleBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.gamma = nn.Parameter(torch.linspace(0.1, 1.0, c))

    def forward(self, x):
        return x + self.gamma.view(1, -1, 1, 1) * self.bn(self.conv(x))


class Classifier(nn.Module):
    """SE block, per-channel layer scale reached through blocks.2.gamma, flatten -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(LayerScaleBlock(16), SEBlock(16), LayerScaleBlock(16))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        x = self.blocks(x)
        x = F.relu(x, inplace=True)
        return self.head(self.drop(torch.flatten(self.pool(x), 1)))


def _trace(model: nn.Module, leaves: tuple[type, ...] = ()) -> fx.GraphModule:
    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    graph = Tracer().trace(model)
    return fx.GraphModule(model, graph, type(model).__name__)


def _roundtrip(gm: fx.GraphModule, tmp_path: Path) -> fx.GraphModule:
    save_graph_module(gm, tmp_path)
    return load_graph_module(tmp_path)


def _assert_same_structure(gm: fx.GraphModule, loaded: fx.GraphModule) -> None:
    assert [n.name for n in loaded.graph.nodes] == [n.name for n in gm.graph.nodes]
    assert [n.op for n in loaded.graph.nodes] == [n.op for n in gm.graph.nodes]
    assert type(loaded).__name__ == type(gm).__name__
    for node in gm.graph.find_nodes(op="call_module"):
        assert type(loaded.get_submodule(node.target)) is type(gm.get_submodule(node.target))
    params, loaded_params = dict(gm.named_parameters()), dict(loaded.named_parameters())
    assert params.keys() == loaded_params.keys()
    for name, p in params.items():
        q = loaded_params[name]
        assert type(q) is nn.Parameter and q.requires_grad == p.requires_grad
        assert q.dtype == p.dtype and torch.equal(q, p)
    buffers, loaded_buffers = dict(gm.named_buffers()), dict(loaded.named_buffers())
    assert buffers.keys() == loaded_buffers.keys()
    for name, b in buffers.items():
        assert loaded_buffers[name].dtype == b.dtype and torch.equal(loaded_buffers[name], b)
    assert gm.state_dict().keys() == loaded.state_dict().keys()
    training = {q: m.training for q, m in gm.named_modules()}
    assert {q: m.training for q, m in loaded.named_modules() if q in training} == training


MODELS = {
    "resnet_block": (ResNetTiny, (2, 3, 16, 16)),
    "shufflenet_block": (ShuffleBlock, (2, 16, 8, 8)),
    "split_slice_index_select": (SplitSliceSelect, (2, 16, 6, 6)),
    "se_layerscale_flatten_linear": (Classifier, (2, 16, 8, 8)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("key", sorted(MODELS))
def test_roundtrip_is_bit_identical(key, dtype, tmp_path):
    torch.manual_seed(0)
    factory, shape = MODELS[key]
    model = _randomize_bn(factory()).to(dtype).eval()
    gm = fx.symbolic_trace(model)
    loaded = _roundtrip(gm, tmp_path)

    _assert_same_structure(gm, loaded)
    x = torch.randn(shape, dtype=dtype)
    expected, got = gm(x.clone()), loaded(x.clone())
    assert got.dtype == dtype
    assert torch.equal(got, expected)
    assert torch.equal(got, model(x.clone()))


class OptionalInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, extra=None):
        return self.conv(x) if extra is None else self.conv(x + extra)


def test_concrete_args_graph_roundtrips(tmp_path):
    # fx records torch.fx._symbolic_trace._assert_is_none for specialized inputs.
    gm = fx.symbolic_trace(OptionalInput(), concrete_args={"extra": None})
    loaded = _roundtrip(gm, tmp_path)
    _assert_same_structure(gm, loaded)
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(loaded(x), gm(x))


def test_training_flags_are_kept_per_module(tmp_path):
    gm = fx.symbolic_trace(_randomize_bn(ResNetTiny()))
    gm.eval()
    gm.get_submodule("layer1.0.bn1").train()
    gm.get_submodule("fc").train()
    loaded = _roundtrip(gm, tmp_path)
    assert {q: m.training for q, m in loaded.named_modules()} == {q: m.training for q, m in gm.named_modules()}


def test_fx_targets_are_stored_as_allowlisted_names(tmp_path):
    model = nn.Sequential(SplitSliceSelect(), ShuffleBlock(20)).eval()
    save_graph_module(fx.symbolic_trace(model), tmp_path)
    doc = json.loads((tmp_path / "graph.json").read_text())
    targets = {n["target"] for n in doc["nodes"] if n["op"] == "call_function"}
    # torch.cat & co. are C builtins whose __module__ is "torch"; torch.split is Python in
    # torch.functional; operators come from _operator and are stored as "operator".
    assert {"torch.functional:split", "operator:getitem", "torch:index_select", "torch:cat",
            "torch:chunk", "operator:add", "operator:floordiv"} <= targets
    methods = {n["target"] for n in doc["nodes"] if n["op"] == "call_method"}
    assert {"chunk", "size", "view", "transpose", "contiguous"} <= methods
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "fn",
    [torch.cat, torch.flatten, torch.split, torch.chunk, F.relu, F.adaptive_avg_pool2d, torch.sigmoid,
     torch.index_select, F.max_pool2d, F.gelu, F.linear, F.conv2d, torch.Tensor.add, torch.Tensor.split,
     operator.add, operator.getitem, operator.mul, math.sqrt, getattr, len],
)
def test_function_targets_resolve_back_to_the_same_objects(fn):
    ref = graph_io._function_ref(fn)
    assert graph_io._resolve_function(ref) is fn, ref


def test_shared_and_plain_tensors_keep_their_kind(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight  # tied weights
    gm = fx.symbolic_trace(model)
    gm.register_buffer("scratch", torch.arange(3.0), persistent=False)
    gm.plain = torch.ones(4)  # plain tensor attribute (not in the state dict) read by get_attr
    output = next(iter(gm.graph.find_nodes(op="output")))
    with gm.graph.inserting_before(output), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx warns: get_attr of a plain attribute is unusual
        plain = gm.graph.get_attr("plain")
        output.args = (gm.graph.call_function(torch.add, (output.args[0], plain)),)
    gm.recompile()
    gm.get_submodule("0").bias.requires_grad_(False)
    loaded = _roundtrip(gm, tmp_path)

    assert loaded.get_submodule("2").weight is loaded.get_submodule("0").weight
    assert "scratch" in dict(loaded.named_buffers()) and "scratch" not in loaded.state_dict()
    assert torch.equal(loaded.plain, gm.plain) and "plain" not in dict(loaded.named_buffers())
    assert not loaded.get_submodule("0").bias.requires_grad
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), gm(x))


# --------------------------------------------------------------------------- custom modules


class ScaledConv2d(nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, scale=1.0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.scale = scale

    def forward(self, x):
        return super().forward(x) * self.scale


class MaskedConv2d(nn.Conv2d):
    """Forwards **kwargs to Conv2d, so its constructor kwargs need an explicit ctor."""

    def __init__(self, *args, keep: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep = keep

    def forward(self, x):
        out = super().forward(x)
        return out * (torch.arange(out.shape[1]) < self.keep).view(1, -1, 1, 1).to(out.dtype)


class Attention(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


class Swishy(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


def test_registered_conv_subclass_roundtrips(tmp_path):
    register_safe_module(ScaledConv2d)
    model = nn.Sequential(ScaledConv2d(3, 6, 3, stride=2, padding=1, scale=0.5), nn.BatchNorm2d(6)).eval()
    _randomize_bn(model)
    gm = _trace(model, leaves=(ScaledConv2d,))
    assert [n.op for n in gm.graph.nodes].count("call_module") == 2
    loaded = _roundtrip(gm, tmp_path)
    assert type(loaded.get_submodule("0")) is ScaledConv2d and loaded.get_submodule("0").scale == 0.5
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(loaded(x), gm(x))


def test_attributes_set_after_construction_are_restored(tmp_path):
    register_safe_module(
        MaskedConv2d,
        ctor=lambda m: {"in_channels": m.in_channels, "out_channels": m.out_channels,
                        "kernel_size": m.kernel_size, "padding": m.padding, "bias": m.bias is not None},
    )
    model = nn.Sequential(MaskedConv2d(3, 8, 3, padding=1, keep=8)).eval()
    model[0].keep = 5  # e.g. a slimmable width chosen after conversion
    gm = _trace(model, leaves=(MaskedConv2d,))
    loaded = _roundtrip(gm, tmp_path)
    assert loaded.get_submodule("0").keep == 5
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(loaded(x), gm(x))


def test_default_ctor_that_loses_arguments_is_refused_at_save(tmp_path):
    register_safe_module(MaskedConv2d)  # default ctor: the *args/**kwargs are not recoverable
    gm = _trace(nn.Sequential(MaskedConv2d(3, 8, 3)), leaves=(MaskedConv2d,))
    with pytest.raises(WorkspaceError, match=r"cannot store module '0' \(.*MaskedConv2d\) safely"):
        save_graph_module(gm, tmp_path)


def test_unregistered_subclass_is_refused_at_save(tmp_path):
    class LocalConv(nn.Conv2d):
        pass

    gm = _trace(nn.Sequential(LocalConv(3, 4, 1)), leaves=(LocalConv,))
    with pytest.raises(WorkspaceError, match=r"cannot store module '0' \(.*LocalConv\) safely"):
        save_graph_module(gm, tmp_path)
    assert not (tmp_path / "graph.json").exists()


def test_unregistered_user_modules_are_refused_at_save(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(Attention(8)))
    gm = _trace(model, leaves=(Attention,))
    with pytest.raises(WorkspaceError, match=r"cannot store module '1\.0' \(.*\.Attention\) safely"):
        save_graph_module(gm, tmp_path)

    gm = _trace(nn.Sequential(nn.Linear(8, 8), Swishy()), leaves=(Swishy,))
    with pytest.raises(graph_io.UnsupportedModuleError, match=r"Swishy\) safely: .*trace through it.*not supported") as info:
        save_graph_module(gm, tmp_path)
    assert info.value.qualname == "1" and info.value.module_class is Swishy and not info.value.registered


def test_unstorable_argument_is_refused_naming_the_node(tmp_path):
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.add, (x, 1j)))  # complex constant
    with pytest.raises(WorkspaceError, match=r"node 'add'.*complex"):
        save_graph_module(fx.GraphModule(nn.Module(), graph), tmp_path)

    def my_function(x):
        return x + 1

    graph = fx.Graph()
    graph.output(graph.call_function(my_function, (graph.placeholder("x"),)))
    with pytest.raises(WorkspaceError, match=r"node 'my_function'.*not on the list"):
        save_graph_module(fx.GraphModule(nn.Module(), graph), tmp_path)


def test_removed_slim_batchnorm_loads_as_plain_batchnorm(tmp_path):
    """Graphs naming dyncompile's removed SlimBatchNorm2d (switchable statistics) load as torch BatchNorm2d."""
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    gm = fx.symbolic_trace(model)
    save_graph_module(gm, tmp_path)
    doc = json.loads((tmp_path / "graph.json").read_text())
    assert doc["modules"]["1"]["class"] == "torch.nn.modules.batchnorm:BatchNorm2d"
    doc["modules"]["1"]["class"] = "dyncompile.layers:SlimBatchNorm2d"
    (tmp_path / "graph.json").write_text(json.dumps(doc))
    loaded = load_graph_module(tmp_path)
    assert type(loaded.get_submodule("1")) is nn.BatchNorm2d
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), gm(x))


# --------------------------------------------------------------------------- tampering


def _saved(tmp_path: Path) -> dict:
    torch.manual_seed(0)
    save_graph_module(fx.symbolic_trace(SplitSliceSelect().eval()), tmp_path)
    return json.loads((tmp_path / "graph.json").read_text())


def _write(tmp_path: Path, doc: dict) -> None:
    (tmp_path / "graph.json").write_text(json.dumps(doc))


def _first(doc: dict, op: str) -> dict:
    return next(n for n in doc["nodes"] if n["op"] == op)


@pytest.mark.parametrize(
    "target",
    ["os:system", "builtins:eval", "subprocess:run", "builtins:exec", "builtins:__import__",
     "torch:load", "torch:save", "torch:from_file", "torch:set_num_threads", "torch:fork",
     "torch:compile", "operator:call", "operator:attrgetter", "torch.serialization:load",
     "torch:_C", "torch.Tensor:register_hook", "torch", "builtins:getattr:x"],
)
def test_tampered_function_target_is_refused(tmp_path, target):
    doc = _saved(tmp_path)
    _first(doc, "call_function")["target"] = target
    _write(tmp_path, doc)
    with pytest.raises(WorkspaceError, match="not one a stored graph may call"):
        load_graph_module(tmp_path)


@pytest.mark.parametrize("method", ["__class__", "__reduce_ex__", "_backward_hooks", "register_hook",
                                    "apply_", "numpy", "untyped_storage", "no_such_method", "a b"])
def test_tampered_method_target_is_refused(tmp_path, method):
    doc = _saved(tmp_path)
    _first(doc, "call_function").update(op="call_method", target=method)
    _write(tmp_path, doc)
    with pytest.raises(WorkspaceError, match="not one a stored graph may call"):
        load_graph_module(tmp_path)


def test_private_getattr_is_refused(tmp_path):
    doc = _saved(tmp_path)
    node = _first(doc, "call_function")
    node["target"], node["args"] = "builtins:getattr", [{"$node": "x"}, "__class__"]
    _write(tmp_path, doc)
    with pytest.raises(WorkspaceError, match="getattr with attribute '__class__'"):
        load_graph_module(tmp_path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: _first(d, "call_function")["kwargs"].update({"dim=1); __import__('os').system('x'); (": 1}),
        lambda d: _first(d, "call_module").update(target='conv")); import os; ("'),
        lambda d: _first(d, "call_module").update(target="forward"),
        lambda d: d["tensors"].update({"training": d["tensors"].pop("index")}),
        lambda d: d["tensors"].update({"conv.__class__": d["tensors"].pop("conv.bias")}),
        lambda d: _first(d, "placeholder").update(target="x=__import__('os')"),
        lambda d: _first(d, "call_function").update(name="os.system"),
        lambda d: d.update(class_name="X(): pass\nimport os\nclass Y"),
        lambda d: d["modules"]["conv"].update({"class": "os:system"}),
        lambda d: d["modules"]["conv"].update({"class": "builtins:eval"}),
        lambda d: d["modules"]["conv"]["kwargs"].update({"in_channels": {"$eval": "1"}}),
        lambda d: d["modules"]["conv"]["kwargs"].update({"in_channels": 13}),
        lambda d: d["modules"]["conv"].update({"state": {"": {"forward": 1}}}),
        lambda d: _first(d, "call_function")["args"].append({"$node": "output"}),
    ],
)
def test_tampered_graph_is_refused(tmp_path, edit):
    doc = _saved(tmp_path)
    edit(doc)
    _write(tmp_path, doc)
    with pytest.raises(WorkspaceError) as info:
        load_graph_module(tmp_path)
    assert "\n" not in str(info.value)


class _Evil:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Evil.ran = True
    return torch.zeros(1)


def test_pickled_object_in_tensors_file_is_refused(tmp_path):
    doc = _saved(tmp_path)
    tensors_path = tmp_path / "graph.tensors.pt"
    tensors = torch.load(tensors_path, weights_only=True)
    tensors["index"] = _Evil()
    torch.save(tensors, tensors_path)
    # An attacker edits the checksum too; weights_only loading must still refuse.
    doc["tensors_file"].update(size=tensors_path.stat().st_size, sha256=graph_io._sha256(tensors_path))
    _write(tmp_path, doc)
    with pytest.raises(WorkspaceError, match="cannot be loaded safely") as info:
        load_graph_module(tmp_path)
    assert "\n" not in str(info.value)
    assert not _Evil.ran


def test_broken_files_give_one_line_errors(tmp_path):
    with pytest.raises(WorkspaceError, match="is missing"):
        load_graph_module(tmp_path / "nowhere")

    doc = _saved(tmp_path)
    text = (tmp_path / "graph.json").read_text()
    (tmp_path / "graph.json").write_text(text[: len(text) // 2])
    with pytest.raises(WorkspaceError, match="not valid JSON"):
        load_graph_module(tmp_path)

    _write(tmp_path, {**doc, "version": 99})
    with pytest.raises(WorkspaceError, match="format version 99"):
        load_graph_module(tmp_path)

    _write(tmp_path, {k: v for k, v in doc.items() if k != "nodes"})
    with pytest.raises(WorkspaceError, match="malformed"):
        load_graph_module(tmp_path)

    _write(tmp_path, doc)
    tensors_path = tmp_path / "graph.tensors.pt"
    data = tensors_path.read_bytes()
    tensors_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WorkspaceError, match="truncated") as info:
        load_graph_module(tmp_path)
    assert "\n" not in str(info.value)

    doc["tensors_file"].update(size=tensors_path.stat().st_size, sha256=graph_io._sha256(tensors_path))
    _write(tmp_path, doc)
    with pytest.raises(WorkspaceError, match="cannot be loaded safely"):
        load_graph_module(tmp_path)

    tensors_path.unlink()
    with pytest.raises(WorkspaceError, match="tensors file .* is missing"):
        load_graph_module(tmp_path)


def test_save_overwrites_and_uses_the_given_name(tmp_path):
    save_graph_module(fx.symbolic_trace(SEBlock().eval()), tmp_path, name="a")
    save_graph_module(fx.symbolic_trace(SEBlock().eval()), tmp_path, name="a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.tensors.pt"]
    load_graph_module(tmp_path, name="a")
    with pytest.raises(WorkspaceError, match="is missing"):
        load_graph_module(tmp_path)


# --------------------------------------------------------------------------- value codec

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=5),
    st.just(Ellipsis), st.sampled_from([torch.float16, torch.int64, torch.bool, torch.channels_last,
                                        torch.strided, torch.device("cpu"), torch.Size([2, 3])]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=3), inner, max_size=3),
        st.tuples(inner, inner, inner).map(lambda t: slice(*t)),
    ),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None)
@given(_values)
def test_value_codec_roundtrips(value):
    encoded = graph_io._encode(value, None, "value")
    decoded = graph_io._decode(json.loads(json.dumps(encoded, allow_nan=False)), None)
    assert graph_io._encode(decoded, None, "value") == encoded
    assert type(decoded) is type(value)
