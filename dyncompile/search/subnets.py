"""Shared-weight sub-nets: run any sub-net on *slices* of one set of full-width weights.

"Slice, don't mask": a sub-net is cut out once as a physically smaller skeleton (`extract_subnet`), and every
forward call feeds it index-selected views of the full weights (`torch.func.functional_call`), so a 25%-MACs
sub-net costs ~25% of the full forward, and gradients land in the shared full weights. Which elements each
sub-net tensor takes comes from `slice_indices`, the same cut `extract_subnet` makes, so training, search,
extraction and deployment agree on every channel.

BatchNorm: each skeleton owns its running statistics. The search evaluates sub-nets with batch statistics
(`bn="batch"`); after training, `calibrate` recomputes a sub-net's statistics (reset, cumulative average) and
returns them in the full tensors' layout, the form `dyncompile.search.result` stores per sub-net.

    net = SharedSubnets(dg)
    logits = net(x, {"layer1": 4})              # 4 groups kept in set 'layer1', every other set at full width
    acc = accuracy(net, {"layer1": 4}, batches)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dyncompile.ir import DynGraph, SubnetConfig
from dyncompile.passes.extract import extract_with_indices, index_probe

__all__ = ["SharedSubnets", "full_config", "config_key", "correct", "accuracy", "accuracy_of", "calibrate", "batchnorms"]

ParamTransform = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def full_config(dg: DynGraph) -> SubnetConfig:
    return {s.name: len(s.groups) for s in dg.free_sets}


def config_key(dg: DynGraph, config: SubnetConfig | None) -> tuple[int, ...]:
    """A hashable, canonical form: groups kept per free set, in set order (missing sets: full)."""
    config = config or {}
    return tuple(int(config.get(s.name, len(s.groups))) for s in dg.free_sets)


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class _Skeleton:
    def __init__(self, module: nn.Module, recipes: dict[str, tuple[torch.Tensor | None, ...]]):
        self.module = module
        self.recipes = recipes


class SharedSubnets(nn.Module):
    """The full model's weights (trainable, `self.full`) and a cache of sub-net skeletons that borrow them."""

    def __init__(self, dg: DynGraph, *, cache_size: int = 96):
        super().__init__()
        self.full = dg.gm
        object.__setattr__(self, "dg", dg)  # plain attribute: the graph module is registered once, as `full`
        self.cache_size = cache_size
        self._skeletons: OrderedDict[tuple[int, ...], _Skeleton] = OrderedDict()
        self._probe = None  # index probe of the weights' layout (values never matter, shapes never change)

    def skeleton(self, config: SubnetConfig | None) -> _Skeleton:
        key = config_key(self.dg, config)
        sk = self._skeletons.get(key)
        if sk is None:
            cfg = dict(zip((s.name for s in self.dg.free_sets), key))
            if self._probe is None:
                self._probe = index_probe(self.full)
            module, recipes = extract_with_indices(self.dg, cfg, weights=self.full, probe=self._probe)
            for p in module.parameters():
                p.requires_grad_(False)  # the skeleton's own copies are never used: the shared weights are
            sk = self._skeletons[key] = _Skeleton(module, recipes)
            while len(self._skeletons) > self.cache_size:
                self._skeletons.popitem(last=False)
        else:
            self._skeletons.move_to_end(key)
        sk.module.train(self.training)
        return sk

    def sliced_parameters(self, sk: _Skeleton, transform: ParamTransform | None = None) -> dict[str, torch.Tensor]:
        full = dict(self.full.named_parameters())
        if transform is not None:
            full = transform(full)
        tensors = {}
        for name, index in sk.recipes.items():
            if name not in full:
                continue  # a buffer: the skeleton keeps its own
            t = full[name]
            for d, idx in enumerate(index):
                if idx is not None:
                    t = t.index_select(d, idx)
            tensors[name] = t
        return tensors

    def forward(self, x: torch.Tensor, config: SubnetConfig | None = None, *,
                transform: ParamTransform | None = None) -> torch.Tensor:
        sk = self.skeleton(config)
        return torch.func.functional_call(sk.module, self.sliced_parameters(sk, transform), (x,), strict=False)


def _set_bn_mode(module: nn.Module, *, batch_statistics: bool) -> list[tuple[nn.Module, Any, bool]]:
    saved = []
    for bn in batchnorms(module):
        saved.append((bn, bn.momentum, bn.training))
        if batch_statistics:
            bn.train()
            bn.momentum = 0.0  # use batch statistics without moving the stored ones
    return saved


def _restore_bn(saved) -> None:
    for bn, momentum, training in saved:
        bn.momentum = momentum
        bn.train(training)


@torch.no_grad()
def correct(net: SharedSubnets, config: SubnetConfig | None, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            *, bn: str = "stored") -> torch.Tensor:
    """Which images sub-net `config` classifies right (a 0/1 vector, in batch order). bn="batch": BatchNorm uses
    each batch's statistics (the search's mode: no calibration per candidate); bn="stored": the skeleton's
    running statistics (after `calibrate`)."""
    was_training = net.training
    net.eval()
    sk = net.skeleton(config)
    saved = _set_bn_mode(sk.module, batch_statistics=bn == "batch")
    hits = []
    try:
        params = net.sliced_parameters(sk)
        for x, y in batches:
            logits = torch.func.functional_call(sk.module, params, (x,), strict=False)
            hits.append(logits.argmax(1) == y)
    finally:
        _restore_bn(saved)
        net.train(was_training)
    return torch.cat(hits).to(torch.uint8) if hits else torch.zeros(0, dtype=torch.uint8)


def accuracy(net: SharedSubnets, config: SubnetConfig | None, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             *, bn: str = "stored", reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Top-1 accuracy of sub-net `config` (`bn` as in `correct`). `reduce` sums the (correct, seen) counts over
    processes when the data is sharded."""
    return accuracy_of(correct(net, config, batches, bn=bn), reduce)


def accuracy_of(hits: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """The accuracy a 0/1 vector of `correct` says, summed over processes by `reduce` when the data is sharded."""
    counts = torch.tensor([float(hits.sum()), float(len(hits))], dtype=torch.float64)
    if reduce is not None:
        counts = reduce(counts)
    return float(counts[0] / counts[1]) if counts[1] else 0.0


@torch.no_grad()
def calibrate(net: SharedSubnets, config: SubnetConfig | None, batches: Iterable[torch.Tensor],
              *, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Recompute sub-net `config`'s BatchNorm statistics (reset, cumulative average over `batches`).

    They stay in the skeleton (so `accuracy(..., bn="stored")` uses them) and are returned in the *full*
    tensors' layout (dropped channels keep the full model's values), with the number of images seen.
    `reduce` averages the statistics over processes when the data is sharded."""
    sk = net.skeleton(config)
    module = sk.module
    was_training = net.training
    net.eval()
    bns = batchnorms(module)
    saved = [(bn, bn.momentum, bn.training) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    seen = 0
    try:
        params = net.sliced_parameters(sk)
        for x in batches:
            torch.func.functional_call(module, params, (x,), strict=False)
            seen += x.shape[0]
    finally:
        _restore_bn(saved)
        net.train(was_training)
    if reduce is not None:
        for bn in bns:
            for t in (bn.running_mean, bn.running_var):
                if t is not None:
                    t.copy_(reduce(t.clone()))
    return _to_full_layout(net, sk), seen


def _to_full_layout(net: SharedSubnets, sk: _Skeleton) -> dict[str, torch.Tensor]:
    """Sub-net BN statistics scattered into full-size tensors (their names are the full model's)."""
    full_state = net.full.state_dict()
    names = {}
    for qualname, m in sk.module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for leaf in ("running_mean", "running_var"):
                names[f"{qualname}.{leaf}" if qualname else leaf] = getattr(m, leaf)
    out = {}
    for name, value in names.items():
        full = full_state[name].detach().clone()
        idx = sk.recipes.get(name, (None,))[0]
        if idx is None:
            full.copy_(value)
        else:
            full[idx] = value
        out[name] = full
    return out


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """In-place distillation loss: cross-entropy against the (detached) largest sub-net's probabilities."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
