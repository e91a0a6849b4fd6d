"""Pass `group`: order each free channel set and split it into G channel groups (the unit a sub-net keeps).

Order matters because sub-nets keep a *prefix* of groups. A set is often consumed in pieces (ShuffleNet's
chunk, slice+concat, constant splits): ordering by the first producer's channel index would hand the whole
prefix to one piece and starve another. So each class is ranked by its relative position inside the
consumer inputs it feeds (min over consumers), ties broken by the canonical order: every consumer then
keeps a share of its channels proportional to the width. A set with fewer classes than G gets one group
per class; a single class cannot be slimmed (reported as not free).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dyncompile.errors import ConfigError
from dyncompile.ir import LABELS, DynGraph

__all__ = ["group", "consumer_inputs"]

CONSUMERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def consumer_inputs(dg: DynGraph) -> dict[str, torch.Tensor]:
    """Class id of every input channel of each conv/linear (by module name)."""
    modules = dict(dg.gm.named_modules())
    result = {}
    for node in dg.gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], CONSUMERS):
            continue
        m = modules[node.target]
        labels = node.args[0].meta.get(LABELS)
        if not isinstance(labels, torch.Tensor):
            continue
        dim = labels.dim() - 1 if isinstance(m, nn.Linear) else 1
        width = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        vec = labels.movedim(dim, 0).reshape(labels.shape[dim], -1)[:, 0]
        result[node.target] = vec.expand(width) if vec.numel() == 1 else vec
    return result


def _rank_classes(dg: DynGraph, inputs: dict[str, torch.Tensor]) -> dict[int, float]:
    rank: dict[int, float] = {}
    for vec in inputs.values():
        for position, c in enumerate(vec.tolist()):
            r = position / len(vec)
            if r < rank.get(c, 2.0):
                rank[c] = r
    return rank


def group(dg: DynGraph, num_groups: int = 8) -> DynGraph:
    """Order and split every set of `dg` (after `couple`) into at most `num_groups` groups."""
    if num_groups < 1:
        raise ConfigError(f"--groups must be at least 1 (got {num_groups})")
    widest = max((s.channels for s in dg.sets), default=0)
    if dg.sets and num_groups > widest:
        raise ConfigError(f"--groups {num_groups} exceeds the widest layer's {widest} channels; use at most {widest}")
    dg.num_groups = num_groups
    inputs = consumer_inputs(dg)
    rank = _rank_classes(dg, inputs)
    first = _first_producer_classes(dg)
    for s in dg.sets:
        # unused classes (rank 2.0: computed but read by no layer) go last, so they are dropped first
        s.classes = sorted(s.classes, key=lambda c, order={c: i for i, c in enumerate(s.classes)}: (rank.get(c, 2.0), order[c]))
        parts = np.array_split(np.asarray(s.classes, dtype=np.int64), min(num_groups, max(len(s.classes), 1)))
        s.groups = [p.tolist() for p in parts if len(p)]
        s.group_channels = [int(np.isin(first[s.name], g).sum()) for g in s.groups]
    _check_no_consumer_starves(dg, inputs)
    return dg


def _check_no_consumer_starves(dg: DynGraph, inputs: dict[str, torch.Tensor]) -> None:
    """At the narrowest sub-net (one group per set) every conv/linear must keep at least one input channel."""
    dropped = set()
    for s in dg.free_sets:
        for g in s.groups[1:]:
            dropped.update(g)
    for name, vec in inputs.items():
        if all(int(c) in dropped for c in vec.tolist()):
            raise ConfigError(f"with --groups {dg.num_groups} layer '{name}' would lose every input channel at the "
                              f"narrowest sub-net; use fewer groups")


def _first_producer_classes(dg: DynGraph) -> dict[str, np.ndarray]:
    """Class id of every output channel of each set's first producer."""
    modules = dict(dg.gm.named_modules())
    by_target = {n.target: n for n in dg.gm.graph.nodes if n.op == "call_module"}
    result = {}
    for s in dg.sets:
        labels = by_target[s.name].meta[LABELS]
        dim = labels.dim() - 1 if isinstance(modules[s.name], nn.Linear) else 1
        vec = labels.movedim(dim, 0).reshape(labels.shape[dim], -1)[:, 0]
        result[s.name] = vec.expand(s.channels).numpy() if vec.numel() == 1 else vec.numpy()
    return result
