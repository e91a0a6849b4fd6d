"""Ranking channel groups inside each coupling set: which group to drop first.

- `noise` (after Parametric Noise Injection, He, Rakin & Fan, CVPR 2019): during a short noise-training pass,
  every conv/linear weight that produces a free set becomes ``W + a[set][g] * n`` with ``n ~ N(0, std(W)^2)``
  redrawn every forward and one trainable scale ``a`` per channel group, shared by every producer of the set
  (the set's channels are one channel space). The weights are frozen: only ``a`` trains (no weight decay), so
  the user's weights are kept. Loss pushes ``a`` down fastest where noise hurts; a group that keeps a large
  ``|a|`` tolerates noise, so it matters less and is dropped first (direction "tolerant-first").
- `l1`: the classic filter-norm criterion: mean L1 norm of the group's output filters over the set's
  producers; the smallest is dropped first.

`group_order(scores, direction)` turns scores into the order the result stores: original group indices, most
important first, so every sub-net keeps a prefix.
"""

from __future__ import annotations

import torch
from torch import nn

from dyncompile.ir import DynGraph
from dyncompile.layer_rules import producer_rule_for
from dyncompile.passes.couple import producer_channel_groups

__all__ = ["producer_groups", "NoiseScales", "l1_scores", "group_order", "RANKINGS", "DIRECTIONS"]

RANKINGS = ("noise", "l1", "none")  # none: the groups keep convert's order
DIRECTIONS = ("tolerant-first", "sensitive-first")


def producer_groups(dg: DynGraph) -> dict[str, tuple[str, torch.Tensor]]:
    """Producer layer (module name) → (its set's name, group index of each output channel; -1 = fixed).

    Only producers whose weight holds output channels along dim 0 (convs, linears; not transposed convs): the
    rankings read and perturb each output channel's filter as `weight[c]`."""
    out = {}
    for s in dg.free_sets:
        for producer in s.producers:
            if producer_rule_for(dg.gm.get_submodule(producer), producer).weight_out_dim == 0:
                out[producer] = (s.name, producer_channel_groups(dg, s, producer))
    return out


class NoiseScales(nn.Module):
    """One trainable noise scale per (set, group); `transform` adds the scaled noise to producer weights."""

    def __init__(self, dg: DynGraph, init: float = 0.25):
        super().__init__()
        self.sets = {s.name: i for i, s in enumerate(dg.free_sets)}
        self.scales = nn.ParameterList([nn.Parameter(torch.full((len(s.groups),), float(init))) for s in dg.free_sets])
        self.producers = producer_groups(dg)
        self.generator: torch.Generator | None = None  # set per step: the noise is a function of (seed, step)

    def transform(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        params = dict(params)
        for producer, (set_name, groups) in self.producers.items():
            name = f"{producer}.weight"
            if name not in params:
                continue  # a fixed filter (a buffer): nothing to perturb
            w = params[name]
            scale = self.scales[self.sets[set_name]]
            per_channel = torch.where(groups >= 0, scale[groups.clamp(min=0)], torch.zeros((), dtype=scale.dtype))
            noise = torch.randn(w.shape, generator=self.generator, dtype=w.dtype) * w.detach().std()
            params[name] = w + per_channel.reshape(-1, *([1] * (w.dim() - 1))) * noise
        return params

    def scores(self) -> dict[str, list[float]]:
        """|a| per group: larger tolerates more noise."""
        return {name: self.scales[i].detach().abs().tolist() for name, i in self.sets.items()}


def l1_scores(dg: DynGraph, weights: nn.Module) -> dict[str, list[float]]:
    """Mean L1 norm of each group's output filters over the set's producers (larger: more important)."""
    sums: dict[str, torch.Tensor] = {s.name: torch.zeros(len(s.groups), dtype=torch.float64) for s in dg.free_sets}
    counts: dict[str, torch.Tensor] = {s.name: torch.zeros(len(s.groups), dtype=torch.float64) for s in dg.free_sets}
    for producer, (set_name, groups) in producer_groups(dg).items():
        layer = weights.get_submodule(producer)
        w = producer_rule_for(layer, producer).computed_weight(layer).detach().to(torch.float64)
        norms = w.abs().reshape(w.shape[0], -1).mean(dim=1)  # per output channel, size-normalised across layers
        kept = groups >= 0
        sums[set_name].index_add_(0, groups[kept], norms[kept])
        counts[set_name].index_add_(0, groups[kept], torch.ones(int(kept.sum()), dtype=torch.float64))
    return {name: (sums[name] / counts[name].clamp(min=1)).tolist() for name in sums}


def group_order(scores: dict[str, list[float]], *, rank: str, direction: str) -> dict[str, list[int]]:
    """Original group indices per set, most important first (stable: ties keep the original order).

    noise + tolerant-first: small |a| is important; l1: large norm is important; sensitive-first reverses;
    none: convert's order, whatever the direction."""
    order = {}
    for name, values in scores.items():
        if rank == "none":
            order[name] = list(range(len(values)))
            continue
        importance = [-v for v in values] if rank == "noise" else list(values)
        if direction == "sensitive-first":
            importance = [-v for v in importance]
        order[name] = sorted(range(len(values)), key=lambda g: (-importance[g], g))
    return order
