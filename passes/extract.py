"""Pass `extract`: cut a sub-net out as a physically smaller, plain `nn.Module` (an fx GraphModule).

No masks: layers with a rule (`dyncompile.layer_rules`: convs, linears, norms…) are cut by their rule to the
kept channels, any other module is copied as it is; parameters used directly in
`forward` are sliced; ops whose arguments encode channel counts (view/reshape sizes, split sizes, chunk,
slices, narrow, index_select indices, the sizes of `torch.zeros`-style fills) are rewritten from the concrete
values seen while tracing, so even sizes written as constants in the model's code come out right. The batch dimension is never touched.
"""

from __future__ import annotations

import copy
import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from dyncompile.errors import ExtractionError
from dyncompile.ir import ARGS, LABELS, REDUCED, SHAPE, DynGraph, SubnetConfig, keep_mask
from dyncompile.layer_rules import layer_rule_for, producer_rule_for
from dyncompile.passes.couple import FILL_FUNCTIONS, FILL_METHODS

__all__ = ["extract_subnet", "extract_with_indices", "index_probe", "slice_indices", "ExtractionError"]


Kept = tuple[int, torch.Tensor] | None  # (dim, kept indices) or None when nothing is dropped


def _kept(labels: Any, shape: Any, keep: torch.Tensor) -> Any:
    if isinstance(labels, tuple):
        return tuple(_kept(lab, shp, keep) for lab, shp in zip(labels, shape))
    if not isinstance(labels, torch.Tensor):
        return None
    k = keep[labels]
    dims = [d for d in range(labels.dim()) if labels.shape[d] > 1]
    if not dims:
        if not bool(k.all()):
            raise ExtractionError("a whole tensor would be dropped")
        return None
    if len(dims) > 1:
        raise ExtractionError(f"labels vary along dims {dims}")
    d = dims[0]
    idx = k.movedim(d, 0).reshape(k.shape[d], -1)[:, 0].nonzero().flatten()
    return None if len(idx) == shape[d] else (d, idx)


def _indices(kept: Kept, dim: int, size: int) -> torch.Tensor:
    if kept is None:
        return torch.arange(size)
    d, idx = kept
    if d != dim:
        raise ExtractionError(f"channels shrink along dim {d}, expected {dim}")
    return idx


class _Extractor:
    def __init__(self, dg: DynGraph, keep: torch.Tensor, weights: fx.GraphModule | None):
        self.dg = dg
        self.gm = dg.gm
        self.weights = weights if weights is not None else dg.gm
        self.modules = dict(self.weights.named_modules())
        self.kept = {n: _kept(n.meta.get(LABELS), n.meta.get(SHAPE), keep) for n in self.gm.graph.nodes}
        self.root: dict[str, Any] = {}
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.buffers = 0

    def run(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            self.env[node] = self.emit(node)
        gm = fx.GraphModule(self.root, self.graph, f"{self.gm.__class__.__name__}Subnet")
        gm.graph.lint()
        return gm

    def arg(self, a: Any) -> Any:
        return fx.map_arg(a, lambda n: self.env[n])

    def copy_node(self, node: fx.Node, args=None, kwargs=None, target=None) -> fx.Node:
        new = self.graph.create_node(node.op, node.target if target is None else target,
                                     self.arg(node.args if args is None else args),
                                     self.arg(node.kwargs if kwargs is None else kwargs), name=node.name)
        new.meta = {}
        return new

    def const_buffer(self, tensor: torch.Tensor) -> fx.Node:
        name = f"dyncompile_index_{self.buffers}"
        self.buffers += 1
        self.root[name] = tensor
        return self.graph.get_attr(name)

    # ── per-node ──
    def emit(self, node: fx.Node) -> fx.Node:
        if node.op == "get_attr":
            return self.emit_constant(node)
        if node.op == "call_module":
            self.root[node.target], gather = self.slice_module(node)
            if gather is None:
                return self.copy_node(node)
            dim, index = gather
            data = self.graph.call_function(torch.index_select, (self.env[node.args[0]], dim, self.const_buffer(index)))
            return self.graph.create_node("call_module", node.target, (data, *self.arg(node.args[1:])),
                                          self.arg(node.kwargs), name=node.name)
        if node.op in ("call_function", "call_method"):
            return self.emit_call(node)
        return self.copy_node(node)

    def emit_constant(self, node: fx.Node) -> fx.Node:
        value = operator.attrgetter(node.target)(self.weights)  # a dotted target: one getattr per part
        kept = self.kept[node]
        if isinstance(value, torch.Tensor):
            sliced = value.detach().index_select(kept[0], kept[1]).clone() if kept else value.detach().clone()
            self.root[node.target] = nn.Parameter(sliced, value.requires_grad) if isinstance(value, nn.Parameter) else sliced
        else:
            self.root[node.target] = copy.deepcopy(value)
        return self.copy_node(node)

    def input_kept(self, node: fx.Node) -> Kept:
        src = node.args[0] if node.args else None  # a placeholder or attribute has no data input
        return self.kept.get(src) if isinstance(src, fx.Node) else None

    def slice_module(self, node: fx.Node) -> tuple[nn.Module, tuple[int, torch.Tensor] | None]:
        """The module cut to the sub-net, and (dim, positions) of its input to gather first, if it reads fewer
        channels than the sub-net keeps there (a grouped conv dropping groups whose inputs stay)."""
        m = self.modules[node.target]
        rule = layer_rule_for(m)
        if rule is None:
            if any(node.target in s.producers for s in self.dg.free_sets):  # slimmed by a rule since unregistered
                producer_rule_for(m, node.target)
            return copy.deepcopy(m), None  # channel-agnostic (activation, pooling…) or opaque (channels fixed)
        out_shape = node.meta[SHAPE]
        in_shape = node.args[0].meta[SHAPE]
        dim = rule.channel_dim % len(out_shape)
        in_idx = _indices(self.input_kept(node), dim, in_shape[dim])
        out_idx = _indices(self.kept[node], dim, out_shape[dim])
        read = rule.inputs_read(m, in_idx, out_idx)
        gather = None if len(read) == len(in_idx) else (dim, torch.isin(in_idx, read).nonzero().flatten())
        return rule.extract(m, read, out_idx), gather

    def emit_call(self, node: fx.Node) -> fx.Node:
        target = node.target
        method = node.op == "call_method"
        data_kept = self.input_kept(node)
        if _rewritten_reduction(node, data_kept):
            return self.emit_channel_reduction(node, *node.meta[REDUCED])
        if target in (operator.getitem, getattr) and isinstance(node.args[0], fx.Node) \
                and _rewritten_reduction(node.args[0], self.input_kept(node.args[0])):
            return self.env[node.args[0]]  # the values of a (values, indices) pair: emitted as the values alone
        if ARGS not in node.meta or (data_kept is None and not _any_kept(self.kept[node])):
            return self.copy_node(node)
        args, kwargs = node.meta[ARGS]
        if (method and target in ("view", "reshape", "expand")) or target is torch.reshape:
            return self.emit_resize(node)
        if (method and target in FILL_METHODS) or (not method and target in FILL_FUNCTIONS):
            return self.emit_filled(node)
        if (method and target in ("split", "chunk", "tensor_split")) or target in (torch.split, torch.chunk, torch.tensor_split):
            return self.emit_split(node, args, kwargs)
        if target is operator.getitem and isinstance(node.args[0], fx.Node) and data_kept is not None:
            return self.emit_getitem(node, data_kept, args[0])
        if (method and target == "narrow") or target is torch.narrow:
            dim, start, length = (list(args) + [kwargs.get("dim"), kwargs.get("start"), kwargs.get("length")])[:3]
            return self.emit_index(node, data_kept, dim, slice(start, start + length))
        if (method and target == "index_select") or target is torch.index_select:
            dim = args[0] if args else kwargs["dim"]
            index = args[1] if len(args) > 1 else kwargs["index"]
            return self.emit_index(node, data_kept, dim, index)
        return self.copy_node(node)

    def emit_channel_reduction(self, node: fx.Node, kind: str, dims: tuple[int, ...]) -> fx.Node:
        """A mean/max/min over channels some of which are dropped, written as the masked model computes it: a
        dropped channel is a 0 there. Mean: the sub-net's sum over the full count. Max/min: the user's own call
        on the kept channels (so a sub-net uses the ops the full model does), clamped at 0 from below/above; a
        (values, indices) result becomes its values alone (couple made sure only they are used)."""
        in_shape = node.args[0].meta[SHAPE]
        out_shape = node.meta[SHAPE]
        pair = bool(out_shape) and isinstance(out_shape[0], tuple)  # (values, indices)
        if kind == "mean":
            keepdim = len(out_shape) == len(in_shape)
            total = self.graph.call_function(torch.sum, (self.env[node.args[0]],), {"dim": dims, "keepdim": keepdim})
            count = math.prod(in_shape[d] for d in dims)
            return self.graph.create_node("call_function", operator.truediv, (total, count), {}, name=node.name)
        extreme = self.graph.create_node(node.op, node.target, self.arg(node.args), self.arg(node.kwargs))
        if pair:
            extreme = self.graph.call_function(operator.getitem, (extreme, 0))
        return self.graph.create_node("call_function", torch.clamp, (extreme,),
                                      {"min" if kind == "max" else "max": 0.0}, name=node.name)

    def emit_resize(self, node: fx.Node) -> fx.Node:
        """view/reshape/expand: every non-batch size becomes the constant the sub-net needs.

        Dynamic sizes computed from channel counts (`c // groups`) would be wrong once `c` shrinks, so only
        the batch size (dim 0) and -1 stay symbolic: sub-nets are specialised to the traced resolution.
        """
        kept = self.kept[node]
        if kept is None:
            return self.copy_node(node)
        dim, idx = kept
        new_shape = list(node.meta[SHAPE])
        new_shape[dim] = len(idx)
        sizes, with_sizes = _sizes_argument(node, node.args[1:], len(new_shape))
        sizes = [s if d == 0 or (isinstance(s, int) and s == -1) else new_shape[d] for d, s in enumerate(sizes)]
        return self.copy_node(node, args=(node.args[0], *with_sizes(sizes)))

    def emit_filled(self, node: fx.Node) -> fx.Node:
        """torch.zeros(b, c, h, w) and friends: only the size along the shrunk dim changes."""
        dim, idx = self.kept[node]
        lead = node.args[:1] if node.op == "call_method" else ()
        sizes, with_sizes = _sizes_argument(node, node.args[len(lead):], len(node.meta[SHAPE]))
        sizes[dim] = len(idx)
        return self.copy_node(node, args=(*lead, *with_sizes(sizes)))

    def emit_split(self, node: fx.Node, args, kwargs) -> fx.Node:
        kept = self.kept[node]
        shapes = node.meta[SHAPE]
        data_shape = node.args[0].meta[SHAPE]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % len(data_shape)
        sizes = [len(k[1]) if k is not None and k[0] == dim else s[dim] for k, s in zip(kept, shapes)]
        return self.graph.create_node("call_function", torch.split, (self.env[node.args[0]], sizes, dim), {},
                                      name=node.name)

    def emit_getitem(self, node: fx.Node, data_kept: Kept, index: Any) -> fx.Node:
        dim, in_idx = data_kept
        items = list(index) if isinstance(index, tuple) else [index]
        rank = len(node.args[0].meta[SHAPE])
        if any(isinstance(i, torch.Tensor) or i is None for i in items):
            raise ExtractionError(f"cannot rewrite advanced indexing at '{node.name}'")
        if Ellipsis in items:
            e = items.index(Ellipsis)
            items = items[:e] + [slice(None)] * (rank - len(items) + 1) + items[e + 1:]
        items += [slice(None)] * (rank - len(items))
        position = items[dim]
        size = node.args[0].meta[SHAPE][dim]
        new_index, needs_select = _remap(position, in_idx, size)
        if needs_select is not None:
            items[dim] = slice(None)
            sliced = self.graph.call_function(operator.getitem, (self.env[node.args[0]], tuple(items)))
            return self.graph.create_node("call_function", torch.index_select,
                                          (sliced, dim, self.const_buffer(needs_select)), {}, name=node.name)
        items[dim] = new_index
        return self.copy_node(node, args=(node.args[0], tuple(items)))

    def emit_index(self, node: fx.Node, data_kept: Kept, dim: int, position: Any) -> fx.Node:
        size = node.args[0].meta[SHAPE][dim]
        dim = dim % len(node.args[0].meta[SHAPE])
        in_idx = data_kept[1] if data_kept is not None and data_kept[0] == dim else torch.arange(size)
        new_index, select = _remap(position, in_idx, size)
        if select is None:
            start, stop = new_index.start, new_index.stop
            return self.graph.create_node("call_function", torch.narrow,
                                          (self.env[node.args[0]], dim, start, stop - start), {}, name=node.name)
        return self.graph.create_node("call_function", torch.index_select,
                                      (self.env[node.args[0]], dim, self.const_buffer(select)), {}, name=node.name)


def _sizes_argument(node: fx.Node, args: tuple, rank: int) -> tuple[list, Any]:
    """The sizes in `args` (``f(*sizes, …)`` or ``f((sizes), …)``) and how to put new sizes back in their place."""
    if args and isinstance(args[0], (tuple, list)):
        sizes, rebuild = list(args[0]), lambda new: (tuple(new), *args[1:])
    else:
        sizes, rebuild = list(args), tuple
    if len(sizes) != rank:
        raise ExtractionError(f"cannot rewrite the sizes of '{node.name}' ({sizes})")
    return sizes, rebuild


def _remap(position: Any, in_idx: torch.Tensor, size: int) -> tuple[Any, torch.Tensor | None]:
    """Map an index along a shrunk dim into the extracted tensor: (slice or int, None) or (None, index tensor)."""
    new_of_old = torch.full((size,), -1, dtype=torch.int64)
    new_of_old[in_idx] = torch.arange(len(in_idx))
    if isinstance(position, int):
        new = int(new_of_old[position % size])
        if new < 0:
            raise ExtractionError("an integer index selects a dropped channel")
        return new, None
    if isinstance(position, slice) and position.step in (None, 1):
        start, stop, _ = position.indices(size)
        kept_before = lambda p: int((in_idx < p).sum())  # noqa: E731
        return slice(kept_before(start), kept_before(max(stop, start))), None
    old = torch.arange(size)[position] if isinstance(position, slice) else torch.as_tensor(position)
    new = new_of_old[old]
    return None, new[new >= 0].clone()


def _rewritten_reduction(node: fx.Node, data_kept: Kept) -> bool:
    """A mean/max/min over channels (couple's REDUCED) of which this sub-net drops some."""
    return REDUCED in node.meta and data_kept is not None and data_kept[0] in node.meta[REDUCED][1]


def _any_kept(kept: Any) -> bool:
    if isinstance(kept, tuple) and kept and not isinstance(kept[0], int):
        return any(k is not None for k in kept)
    return kept is not None


def extract_subnet(dg: DynGraph, config: SubnetConfig, weights: fx.GraphModule | None = None) -> fx.GraphModule:
    """The sub-net `config` as a plain, physically smaller GraphModule (eval mode, original dtype).

    `weights`: a copy of `dg.gm` with other weights (e.g. randomised statistics); default `dg.gm`.
    """
    with torch.no_grad():
        gm = _Extractor(dg, keep_mask(dg, config), weights).run()
    return gm.train(dg.gm.training)


def _unravel(flat: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    coords = []
    for size in reversed(shape):
        coords.append(flat % size)
        flat = flat // size
    return coords[::-1]


def index_probe(weights: nn.Module) -> tuple[nn.Module, dict[str, tuple[int, ...]]]:
    """A copy of `weights` whose floating tensors hold their own flat element indices (float64: exact)."""
    probe = copy.deepcopy(weights)
    shapes = {}
    for name, t in list(probe.state_dict(keep_vars=True).items()):
        if not t.is_floating_point():
            continue
        shapes[name] = tuple(t.shape)
        owner_name, _, leaf = name.rpartition(".")
        owner = probe.get_submodule(owner_name) if owner_name else probe
        flat = torch.arange(t.numel(), dtype=torch.float64).reshape(t.shape)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(flat, requires_grad=False)
        else:
            owner._buffers[leaf] = flat
    return probe, shapes


def extract_with_indices(dg: DynGraph, config: SubnetConfig, weights: fx.GraphModule | None = None,
                         probe: tuple[nn.Module, dict] | None = None, *, allow_non_slices: bool = False
                         ) -> tuple[fx.GraphModule, dict[str, tuple[torch.Tensor | None, ...] | None]]:
    """`extract_subnet` plus how it cut each floating tensor: state-dict name → kept indices per dim (None: all).

    The cut is found by extracting from an `index_probe` of the weights (pass one in to reuse it) and reading
    the indices back, so it can never disagree with `extract_subnet`; each is checked to be an outer-product
    cut. The returned module then gets the real values. This lets training run a sub-net on *slices* of the
    shared full weights (gradients flow back) and lets a deployable store the full weights once.

    `allow_non_slices`: a tensor that is not an outer-product cut (e.g. a grouped conv's weight slimmed by
    position) gets the recipe None, and its gathered values, instead of raising ExtractionError.
    """
    source = weights if weights is not None else dg.gm
    probe_module, shapes = probe if probe is not None else index_probe(source)
    sub = extract_subnet(dg, config, weights=probe_module)
    full_state = source.state_dict()
    recipes = {}
    for name, t in list(sub.state_dict(keep_vars=True).items()):
        if name not in shapes:
            continue
        shape = shapes[name]
        got = t.detach().to(torch.int64)
        coords = _unravel(got.reshape(-1), shape) if got.numel() else None
        index = []
        for d, size in enumerate(shape):
            if coords is None:
                index.append(torch.zeros(0, dtype=torch.int64))
                continue
            along = coords[d].reshape(got.shape)[(0,) * d + (slice(None),) + (0,) * (len(shape) - d - 1)]
            index.append(None if len(along) == size and bool((along == torch.arange(size)).all()) else along.clone())
        cut = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
        real = full_state[name].detach()
        for d, idx in enumerate(index):
            if idx is not None:
                cut = cut.index_select(d, idx)
                real = real.index_select(d, idx)
        if not torch.equal(cut, got) and allow_non_slices:
            index, real = None, full_state[name].detach().reshape(-1)[got.reshape(-1)].reshape(got.shape)
        elif not torch.equal(cut, got):
            raise ExtractionError(f"'{name}' is not an outer-product slice of the full tensor")
        recipes[name] = None if index is None else tuple(index)
        owner_name, _, leaf = name.rpartition(".")
        owner = sub.get_submodule(owner_name) if owner_name else sub
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(real.clone(), requires_grad=t.requires_grad)
        else:
            owner._buffers[leaf] = real.clone()
    return sub, recipes


def slice_indices(dg: DynGraph, config: SubnetConfig, weights: fx.GraphModule | None = None
                  ) -> dict[str, tuple[torch.Tensor | None, ...]]:
    """How `extract_subnet` cuts each floating tensor (see `extract_with_indices`)."""
    return extract_with_indices(dg, config, weights)[1]
