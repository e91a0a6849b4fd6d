"""The one data structure every conversion pass reads and extends: `DynGraph`.

    model ──trace──▶ DynGraph(gm) ──couple──▶ + channel classes, coupling graph, channel sets
          ──group──▶ + channel groups per set ──rewrite / extract──▶ slimmable model / static sub-nets

Per-node facts live on the fx graph itself (`node.meta`), as torch.fx's own passes do:

- ``node.meta[LABELS]``: for a tensor-valued node, an int64 tensor of *channel-class ids* with the same rank
  as the value and size 1 along every dim where the id does not vary ("compressed"); a tuple of such for a
  tuple-valued node; None otherwise. Two elements with the same class id are kept or dropped together.
- ``node.meta[SHAPE]``: the real shape seen while tracing at batch 1 (tuple, or tuple of tuples).
- ``node.meta[OPAQUE]``: on a functional layer call left as it is, why (the coupling analysis reports it).

Class id 0 (`FIXED`) is the class of everything that must never be dropped (network input, classifier
output, whatever feeds an operation the analysis does not understand).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

__all__ = ["ARGS", "FIXED", "LABELS", "OPAQUE", "REDUCED", "SHAPE", "ChannelSet", "DynGraph", "SubnetConfig",
           "uniform_config", "keep_mask", "reorder_groups", "output_tensors"]

FIXED = 0
LABELS = "dyncompile_labels"
SHAPE = "dyncompile_shape"
ARGS = "dyncompile_args"  # concrete (args, kwargs) of rearranging ops, seen while tracing
OPAQUE = "dyncompile_opaque"  # why a functional layer call was not lifted into a layer (passes/functional.py)
REDUCED = "dyncompile_reduced"  # (kind, dims) of a mean/max/min over channels that extract writes out (couple._reduce)


@dataclass
class ChannelSet:
    """Channels that move together: the outputs of one or more producer layers tied by adds, gates, groups…

    ``classes`` are the set's free channel classes in canonical order (first producer in graph order, then
    channel index); ``groups`` partitions them into the G channel groups a sub-net keeps a prefix of.
    """

    name: str
    producers: list[str]
    channels: int  # output channels of the first producer
    classes: list[int]
    fixed_channels: int = 0  # the first producer's channels tied to FIXED (always kept)
    fixed_reasons: list[str] = field(default_factory=list)
    groups: list[list[int]] = field(default_factory=list)
    group_channels: list[int] = field(default_factory=list)  # channels of the first producer per group

    @property
    def free(self) -> bool:
        return len(self.groups) > 1

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "producers": self.producers,
            "channels": self.channels,
            "classes": len(self.classes),
            "fixed_channels": self.fixed_channels,
            "fixed_reasons": self.fixed_reasons,
            "groups": len(self.groups),
            "group_channels": self.group_channels,
        }


@dataclass
class DynGraph:
    """A traced model and everything the passes learned about its channels."""

    gm: fx.GraphModule
    input_shape: tuple[int, ...]
    num_classes: int = 0  # class ids are 0 .. num_classes-1
    coupling: nx.Graph = field(default_factory=nx.Graph)  # producer layers; edges where channels are tied
    sets: list[ChannelSet] = field(default_factory=list)
    fixed_reasons: list[str] = field(default_factory=list)  # why channels were kept at full width
    num_groups: int = 0
    group_multiple: int = 1  # every group a multiple of this many channels where a set allows (passes/group.py)
    trace_mode: str = "symbolic"
    leaf_modules: tuple[str, ...] = ()  # submodules kept opaque (--leaf): not traced, kept at full width

    def set_by_name(self, name: str) -> ChannelSet:
        for s in self.sets:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def free_sets(self) -> list[ChannelSet]:
        return [s for s in self.sets if s.free]

    def with_tensors(self, tensors: dict[str, torch.Tensor] | None) -> DynGraph:
        """This graph with some of its tensors replaced (a sub-net's own BatchNorm statistics), as a copy that
        shares the sets; `self` is left unchanged (and returned as it is when there is nothing to replace)."""
        if not tensors:
            return self
        new = copy.copy(self)
        new.gm = copy.deepcopy(self.gm)
        new.gm.load_state_dict(tensors, strict=False)
        return new


SubnetConfig = dict  # set name -> number of channel groups kept (a prefix of the set's groups)


def output_tensors(value) -> tuple[torch.Tensor, ...]:
    """A model's output as a flat tuple of tensors, in order: the one reading of "what a model returns" for
    every step that compares, exports or runs outputs (a tensor, or a possibly nested tuple/list of tensors,
    as dense-prediction models return several maps). Raises TypeError for anything else."""
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)):
        return tuple(t for item in value for t in output_tensors(item))
    raise TypeError(f"a model output must be a tensor or a tuple/list of tensors, not {type(value).__name__}")


def uniform_config(dg: DynGraph, width: float) -> SubnetConfig:
    """Every free set keeps ceil(width × its group count) groups (at least one)."""
    if not 0 < width <= 1:
        raise ValueError(f"width must be in (0, 1], got {width}")
    return {s.name: max(1, math.ceil(width * len(s.groups) - 1e-9)) for s in dg.free_sets}


def keep_mask(dg: DynGraph, config: SubnetConfig) -> torch.Tensor:
    """Bool vector over class ids: True where the sub-net keeps the channel class."""
    keep = torch.ones(dg.num_classes, dtype=torch.bool)
    for s in dg.free_sets:
        kept = config.get(s.name, len(s.groups))
        if not 1 <= kept <= len(s.groups):
            raise ValueError(f"set {s.name!r} has {len(s.groups)} groups; cannot keep {kept}")
        for group in s.groups[kept:]:
            keep[group] = False
    return keep


def reorder_groups(dg: DynGraph, order: dict[str, list[int]]) -> None:
    """Put the groups of every set named in `order` in that order, in place.

    `order[set]` lists the set's original group indices, the first kept first. Sub-nets keep a prefix of each
    set's groups, so this is how a ranking of the groups becomes nested sub-nets.
    Raises ValueError, before changing anything, unless each order is a permutation of its set's groups."""
    named = [(s, order[s.name]) for s in dg.sets if s.name in order]
    for s, o in named:
        if sorted(o) != list(range(len(s.groups))):
            raise ValueError(f"set {s.name!r} has {len(s.groups)} groups; {list(o)} is not an order of them")
    for s, o in named:
        s.groups = [s.groups[i] for i in o]
        s.group_channels = [s.group_channels[i] for i in o]
