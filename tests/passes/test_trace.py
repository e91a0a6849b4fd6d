"""The trace pass: plain fx first, then the concrete fallback, then one clear error."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dyncompile.errors import TraceError
from dyncompile.passes.trace import trace
from dyncompile.pipeline import analyse_model
from dyncompile.verify import verify


class LoopOverShape(nn.Module):
    """Python loops over a size: fx's symbolic sizes cannot be used in range()."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        pieces = [x[:, 4 * i: 4 * i + 4] for i in range(x.size(1) // 4)]
        x = torch.cat(pieces[::-1], 1)
        if x.shape[1] > 8:
            x = F.relu(x)
        return self.fc(self.head(x).mean((2, 3)).view(x.size(0), -1))


class IterateSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, groups=c) for c in (4, 8))
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([conv(t) for t, conv in zip(torch.split(x, [4, 8], 1), self.convs)], 1)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("model", [LoopOverShape, IterateSplit])
def test_concrete_fallback_traces_and_stays_exact_at_other_batch_sizes(model):
    dg = analyse_model(model().eval(), (1, 3, 8, 8), groups=4)
    assert dg.trace_mode == "concrete"
    assert len(dg.free_sets) >= 1
    for r in verify(dg, [1.0, 0.5, 0.25]):  # verify runs at batch 2: the batch size stayed symbolic
        assert r.ok, r.problems


class ValueControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            return y
        return -y


def test_value_dependent_control_flow_gets_one_line_error():
    with pytest.raises(TraceError) as info:
        trace(ValueControlFlow(), (1, 3, 4, 4))
    message = str(info.value)
    assert "\n" not in message and "test_trace.py:" in message and "if y.sum() > 0" in message


# ── Python that is static once the input shape is known (issue 15) ──
class ShapeAsserts(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gate = nn.Conv2d(8, 1, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        assert x.size(1) == 3
        y = F.relu(self.conv1(x))
        assert y.shape[1] % 2 == 0, "even channels"
        z = self.conv2(y)
        assert z.shape == y.shape  # compares the two batch sizes too
        att = self.gate(z)
        assert att.size(1) == 1
        return self.fc((y + z * torch.sigmoid(att)).mean((2, 3)))


class ZeroPaddedShortcut(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.ext = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        main = self.pool(x)
        b, c, h, w = main.shape
        main = torch.cat([main, torch.zeros(b, 16 - c, h, w, dtype=x.dtype, device=x.device)], 1)
        return self.fc(F.relu(main + self.ext(x)).mean((2, 3)))


class ForwardFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)])
        self.fc = nn.Linear(8, 4)

    def forward(self, x, only_last=True, scale=None):
        features = []
        for conv in self.convs:
            x = F.relu(conv(x))
            features.append(x)
        if scale is not None:
            x = x * scale
        if only_last:
            return self.fc(x.mean((2, 3)))
        return [f.mean((2, 3)) for f in features]


class TrainingOnlyDropPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.paths = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)])
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        n_drop = int(x.size(0) * 0.5)  # differs between batch sizes, used only in training
        stacked = torch.stack([p(x) for p in self.paths])
        if self.training and n_drop > 0:
            stacked[:, :n_drop] = stacked[:, :n_drop] * (torch.rand(2, n_drop, 1, 1, 1) > 0.5)
        return self.fc(stacked.mean(0).mean((2, 3)))


STATIC_PYTHON = [ShapeAsserts, ZeroPaddedShortcut, ForwardFlag, TrainingOnlyDropPath]


@pytest.mark.parametrize("model", STATIC_PYTHON)
def test_static_python_idioms_trace_concretely(model):
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model().eval())  # the idiom is what stops plain fx
    m = model().eval()
    dg = trace(m, (1, 3, 8, 8))
    assert dg.trace_mode == "concrete"
    assert [n.name for n in dg.gm.graph.nodes if n.op == "placeholder"] == ["x"]  # flags are specialised away
    x = torch.randn(3, 3, 8, 8)  # traced at batch 1: the batch size stayed symbolic
    with torch.no_grad():
        assert torch.allclose(dg.gm(x), m(x), atol=1e-6)


@pytest.mark.parametrize("model", STATIC_PYTHON)
def test_static_python_idioms_convert_and_verify(model):
    dg = analyse_model(model().eval(), (1, 3, 8, 8), groups=4)
    assert len(dg.free_sets) >= 1
    for r in verify(dg, [1.0, 0.5, 0.25]):  # verify runs at batch 2
        assert r.ok, r.problems


def test_zero_fill_shrinks_with_the_channels_it_pads():
    from dyncompile.ir import uniform_config
    from dyncompile.passes.extract import extract_subnet

    dg = analyse_model(ZeroPaddedShortcut().eval(), (1, 3, 8, 8), groups=4)
    ext = next(s for s in dg.free_sets if "ext" in s.producers)
    assert ext.producers == ["stem", "ext"] and len(ext.classes) == 16  # 8 stem channels + 8 zero channels
    subnet = extract_subnet(dg, uniform_config(dg, 0.5))
    zeros = next(n for n in subnet.graph.nodes if n.target is torch.zeros)
    assert 0 < zeros.args[1] < 8 and zeros.args[2:] == (4, 4)  # fewer zero channels, for fewer `ext` channels
    assert isinstance(zeros.args[0], torch.fx.Node)  # the batch stays a graph value
    assert subnet(torch.randn(3, 3, 8, 8)).shape == (3, 4)


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.abs().amax().item() > 1:  # a tensor value: never answered at the example
            y = y / 2
        return y


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.stem(x))


def test_value_dependent_branch_in_a_module_names_the_line_and_the_leaf_fix():
    with pytest.raises(TraceError) as info:
        trace(WithGate(), (1, 3, 4, 4))
    message = str(info.value)
    assert "\n" not in message and "if y.abs().amax().item() > 1" in message and "--leaf gate" in message
    assert trace(WithGate(), (1, 3, 4, 4), leaf_modules=("gate",)).trace_mode == "symbolic"


class BatchBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if x.size(0) > 1:  # a different graph at batch 1 and 2: cannot be traced once for every batch
            y = y - y.mean(0, keepdim=True)
        return y


def test_branch_on_the_batch_size_is_refused_not_specialised():
    with pytest.raises(TraceError) as info:
        trace(BatchBranch(), (1, 3, 4, 4))
    message = str(info.value)
    assert "\n" not in message and "if x.size(0) > 1" in message and "batch size" in message
