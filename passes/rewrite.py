"""Pass `rewrite`: the slimmable model — original graph, slimmable layers, and channel-group masks.

`insert_channel_masks` puts a `ChannelMask` after every node whose output carries droppable channels, so a
dropped channel is zero wherever it appears: this masked graph is the *reference semantics* of a sub-net
(verify compares extracted sub-nets against it). `to_slimmable_layers` swaps each layer whose rule has a
slimmable form (convs, transposed convs, linears: `dyncompile.layer_rules`) for that `Slim*` subclass (same
computation, plus channel-group metadata); BatchNorm stays plain torch BatchNorm.
`set_subnet` switches every mask of a converted model to a sub-net configuration.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from dyncompile.ir import FIXED, LABELS, DynGraph, SubnetConfig, keep_mask
from dyncompile.layer_rules import layer_rule_for
from dyncompile.layers import ChannelMask
from dyncompile.passes.couple import producer_channel_groups

__all__ = ["insert_channel_masks", "to_slimmable_layers", "set_subnet", "convert_to_slimmable"]

MASK_PREFIX = "dyncompile_mask"


def _droppable(dg: DynGraph) -> torch.Tensor:
    droppable = torch.zeros(dg.num_classes, dtype=torch.bool)
    for s in dg.free_sets:
        for g in s.groups:
            droppable[g] = True
    droppable[FIXED] = False
    return droppable


def insert_channel_masks(dg: DynGraph, gm: fx.GraphModule | None = None) -> fx.GraphModule:
    """A copy of `gm` (default: the traced model) with a ChannelMask after every droppable-channel node."""
    gm = copy.deepcopy(gm if gm is not None else dg.gm)
    droppable = _droppable(dg)
    for node in list(gm.graph.nodes):
        labels = node.meta.get(LABELS)
        if not isinstance(labels, torch.Tensor) or not bool(droppable[labels].any()):
            continue
        name = f"{MASK_PREFIX}_{node.name}"
        gm.add_submodule(name, ChannelMask(labels))
        with gm.graph.inserting_after(node):
            masked = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(masked, delete_user_cb=lambda user: user is not masked)
        masked.meta[LABELS] = labels
    gm.graph.lint()
    gm.recompile()
    return gm


def to_slimmable_layers(dg: DynGraph, gm: fx.GraphModule) -> fx.GraphModule:
    """Replace the layers of `gm` that have a slimmable form (their rule's `slim_class`: convs, linears), in
    place, by that Slim* layer with the same weights."""
    set_of_producer = {p: s for s in dg.sets for p in s.producers}
    for name, module in list(gm.named_modules()):
        rule = layer_rule_for(module)
        slim_cls = rule.slim_class if rule is not None else None
        if slim_cls is None or type(module) not in slim_cls.__bases__:
            continue  # only the exact class a Slim* layer was made from (a subclass keeps its own type)
        slim = copy.deepcopy(module)
        slim.__class__ = slim_cls
        slim.init_groups()
        if name in set_of_producer:
            slim.channel_set = set_of_producer[name].name
            slim.out_group.copy_(producer_channel_groups(dg, set_of_producer[name], name))
        gm.set_submodule(name, slim)
    gm.recompile()
    return gm


def convert_to_slimmable(dg: DynGraph) -> fx.GraphModule:
    """The converted model: masks + slimmable layers; at full width it computes exactly the original."""
    return to_slimmable_layers(dg, insert_channel_masks(dg))


def set_subnet(model: fx.GraphModule, dg: DynGraph, config: SubnetConfig | None) -> None:
    """Point every mask of a masked/converted model at `config` (None = full width)."""
    keep = torch.ones(dg.num_classes, dtype=torch.bool) if config is None else keep_mask(dg, config)
    for module in model.modules():
        if isinstance(module, ChannelMask):
            module.set_keep(keep)
