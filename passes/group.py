"""Pass `group`: order each free channel set and split it into G channel groups (the unit a sub-net keeps).

Order matters because sub-nets keep a *prefix* of groups. A set is often consumed in pieces (ShuffleNet's
chunk, slice+concat, constant splits, half-IN/half-BN): ordering by the first producer's channel index
would hand the whole prefix to one piece and starve another. So each class is ranked by its relative
position inside every tensor it appears in (the minimum), ties broken by the canonical order: every piece
then keeps a share of its channels proportional to the width. Where one group cannot serve every piece (a
4-group shuffle feeding a chunk), the first group grows until it does. A set with fewer classes than G gets one group
per class; a single class cannot be slimmed (reported as not free). With a group multiple m (`convert
--group-multiple`), the split is over runs of m classes, so narrow sets get fewer groups of m channels each.
"""

from __future__ import annotations

import numpy as np
import torch

from dyncompile.errors import ConfigError
from dyncompile.ir import LABELS, DynGraph
from dyncompile.passes.couple import producer_channel_classes

__all__ = ["group"]


def _channel_vectors(dg: DynGraph) -> list[torch.Tensor]:
    """The class ids along the varying dim of every tensor in the graph (its 'channels')."""
    vectors = []
    for node in dg.gm.graph.nodes:
        labels = node.meta.get(LABELS)
        for t in labels if isinstance(labels, tuple) else (labels,):
            if isinstance(t, torch.Tensor):
                dims = [d for d in range(t.dim()) if t.shape[d] > 1]
                if len(dims) == 1:
                    vectors.append(t.movedim(dims[0], 0).reshape(-1))
                elif not dims:  # one class throughout (e.g. a one-channel slice): it must keep that class
                    vectors.append(t.reshape(1))
    return vectors


def _rank_classes(vectors: list[torch.Tensor]) -> dict[int, float]:
    rank: dict[int, float] = {}
    for vec in vectors:
        for position, c in enumerate(vec.tolist()):
            r = position / len(vec)
            if r < rank.get(c, 2.0):
                rank[c] = r
    return rank


def group(dg: DynGraph, num_groups: int = 8, multiple: int = 1) -> DynGraph:
    """Order and split every set of `dg` (after `couple`) into at most `num_groups` groups, each a multiple of
    `multiple` channels where the set allows (its last group takes the remainder): sub-nets then have channel
    counts that fill the target's vector registers, at the price of fewer, coarser groups in narrow sets."""
    if num_groups < 1:
        raise ConfigError(f"--groups must be at least 1 (got {num_groups})")
    if multiple < 1:
        raise ConfigError(f"--group-multiple must be at least 1 (got {multiple})")
    widest = max((s.channels for s in dg.sets), default=0)
    if dg.sets and num_groups > widest:
        raise ConfigError(f"--groups {num_groups} exceeds the widest layer's {widest} channels; use at most {widest}")
    dg.num_groups, dg.group_multiple = num_groups, multiple
    vectors = _channel_vectors(dg)
    rank = _rank_classes(vectors)
    first = _first_producer_classes(dg)
    for s in dg.sets:
        # unused classes (rank 2.0: computed but read by no layer) go last, so they are dropped first
        s.classes = sorted(s.classes, key=lambda c, order={c: i for i, c in enumerate(s.classes)}: (rank.get(c, 2.0), order[c]))
        s.groups = _split_in_multiples(s.classes, num_groups, _first_group_minimum(s.classes, vectors), multiple)
        s.group_channels = [int(np.isin(first[s.name], g).sum()) for g in s.groups]
    _check_no_tensor_starves(dg, vectors)
    return dg


def _first_group_minimum(classes: list[int], vectors: list[torch.Tensor]) -> int:
    """How many classes the first group needs so that no tensor made only of this set's classes is emptied."""
    position = {c: i for i, c in enumerate(classes)}
    need = 1
    for vec in vectors:
        positions = [position.get(int(c)) for c in vec.unique()]
        if positions and all(p is not None for p in positions):
            need = max(need, min(positions) + 1)
    return need


def _split(classes: list[int], num_groups: int, first_at_least: int) -> list[list[int]]:
    """Split into at most `num_groups` near-equal groups, the first holding at least `first_at_least` classes."""
    if not classes:
        return []
    count = min(num_groups, len(classes))
    even = np.array_split(np.asarray(classes, dtype=np.int64), count)
    if len(even[0]) >= first_at_least:
        return [p.tolist() for p in even]
    first, rest = classes[:first_at_least], classes[first_at_least:]
    if not rest:
        return [first]
    return [first] + [p.tolist() for p in np.array_split(np.asarray(rest, dtype=np.int64), min(count - 1, len(rest))) if len(p)]


def _split_in_multiples(classes: list[int], num_groups: int, first_at_least: int, multiple: int) -> list[list[int]]:
    """`_split` over runs of `multiple` consecutive classes (the last run may be shorter), so every group but
    the last holds a multiple of `multiple` classes."""
    if multiple == 1:
        return _split(classes, num_groups, first_at_least)
    runs = [classes[i:i + multiple] for i in range(0, len(classes), multiple)]
    parts = _split(list(range(len(runs))), num_groups, -(-first_at_least // multiple))
    return [[c for r in part for c in runs[r]] for part in parts]


def _check_no_tensor_starves(dg: DynGraph, vectors: list[torch.Tensor]) -> None:
    """At the narrowest sub-net (one group per set) no tensor may lose every channel."""
    dropped = torch.zeros(dg.num_classes, dtype=torch.bool)
    for s in dg.free_sets:
        for g in s.groups[1:]:
            dropped[g] = True
    for vec in vectors:
        if bool(dropped[vec].all()):
            raise ConfigError(f"with --groups {dg.num_groups} some tensor would lose every channel at the narrowest "
                              f"sub-net; use fewer groups")


def _first_producer_classes(dg: DynGraph) -> dict[str, np.ndarray]:
    """Class id of every output channel of each set's first producer."""
    return {s.name: producer_channel_classes(dg, s.name).numpy() for s in dg.sets}
