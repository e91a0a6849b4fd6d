"""MACs and parameter counts of (sub-)networks: the one place they are computed.

MACs come from `torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2), not from hand formulas, so every
layer torch counts is counted the same way everywhere in dyncompile.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "count_params"]


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass at `input_shape` (batch included).

    Runs in eval mode: a training-mode forward of the zero probe would move every BatchNorm's running
    statistics (it did: the search's "model as given" accuracy read 82.6% for an 87.0% model)."""
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    x = torch.zeros(*input_shape, dtype=dtype)
    counter = FlopCounterMode(display=False)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        for m, training in modes.items():
            m.training = training
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
