"""Per-sub-net BatchNorm statistics: recalibrate (reset, cumulative average over data), store, switch.

Why: a narrower sub-net feeds its BNs different activations, so the full model's running statistics are
wrong for it. `calibrate_statistics` recomputes them on training data for one sub-net configuration (masks
set), and stores them in every `Slim*BatchNorm` under the sub-net's name; `use_statistics` switches.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dyncompile.ir import DynGraph, SubnetConfig
from dyncompile.layers import _SwitchableStatistics
from dyncompile.passes.rewrite import set_subnet

__all__ = ["calibrate_statistics", "use_statistics"]


def _switchable(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _SwitchableStatistics)]


@torch.no_grad()
def calibrate_statistics(model: nn.Module, dg: DynGraph, name: str, config: SubnetConfig | None,
                         batches: Iterable[torch.Tensor]) -> int:
    """Recompute BN statistics of `model` (a converted model) for sub-net `config`; returns images seen."""
    set_subnet(model, dg, config)
    bns = _switchable(model)
    saved = [(bn.momentum, bn.training) for bn in bns]
    was_training = model.training
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch weighs the same
        bn.train()
    seen = 0
    for x in batches:
        model(x)
        seen += x.shape[0]
    for bn, (momentum, training) in zip(bns, saved):
        bn.momentum = momentum
        bn.train(training)
        bn.store_statistics(name)
    model.train(was_training)
    return seen


def use_statistics(model: nn.Module, name: str | None) -> None:
    """Switch every slimmable BN to the statistics stored under `name` (None: the original ones)."""
    for bn in _switchable(model):
        bn.use_statistics(name)
