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
