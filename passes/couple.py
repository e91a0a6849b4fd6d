"""Pass `couple`: find which channels must be kept or dropped together.

How it works (no pattern matching): every output channel of a producer layer (conv, linear) gets a fresh
*atom* id. The graph is run once on an example input while a second, integer "label" tensor rides along
with every value. Operations that only move elements around (view, transpose, cat, chunk, split, slicing,
index_select, pad, pixel/channel shuffle…) are applied *to the label tensor itself*, so channel shuffles,
constant split sizes, slice+concat and flatten→linear come out exactly, whatever the code looks like.
Operations that combine elements position-wise (add, mul, gates) tie the atoms they meet (union-find).
Layers (convs, linears, norms…) are handled by their rule in `dyncompile.layer_rules`: a grouped conv ties
input and output channels of each conv-group, a GroupNorm its norm groups. Anything not understood is *fixed*
(kept at full width) and the reason recorded, never guessed.

Two invariants keep every sub-net extractable as a plain smaller network:
- every label tensor varies along at most one dim (a 2-group channel shuffle therefore ties channel j of
  both halves: shuffling is *not* an identity, and the analysis refuses to pretend it is);
- a layer that consumes channels (conv, linear, BN) sees labels varying only along its channel dim.

Result, written into the DynGraph: final class ids on every node (`node.meta[LABELS]`), the producer-level
coupling graph (networkx, edges say where channels were tied), and the channel sets.

Example::

    dg = trace(model, (1, 3, 32, 32)); couple(dg)
    for s in dg.sets: print(s.name, s.channels, len(s.classes), s.producers)
"""

from __future__ import annotations

import inspect
import operator
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import networkx as nx
import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.operator_schemas import get_signature_for_torch_op

from dyncompile.ir import ARGS, FIXED, LABELS, OPAQUE, REDUCED, SHAPE, ChannelSet, DynGraph
from dyncompile.layer_rules import has_torch_forward, layer_rule_for, producer_rule_for

__all__ = ["couple", "analyse", "positional_data", "CouplingAnalysis", "GROUPED_CONV_MODES", "REDUCTIONS",
           "has_torch_forward", "channel_vector", "producer_channel_classes", "producer_channel_groups"]

GROUPED_CONV_MODES = ("auto", "group", "position")
_MAX_PARAM_ATOMS = 1 << 16  # larger constant tensors (embeddings…) are simply fixed


# ───────────────────────────── union-find over channel atoms ─────────────────────────────
class ChannelUnionFind:
    """Atoms are ints; the root of a class is its smallest atom, so the FIXED class keeps id 0."""

    def __init__(self) -> None:
        self.parent = np.zeros(1024, dtype=np.int64)
        self.count = 1  # atom 0 = FIXED
        self.owner: list[str] = ["<fixed>"]

    def new(self, n: int, owner: str) -> torch.Tensor:
        while self.count + n > len(self.parent):
            self.parent = np.concatenate([self.parent, np.zeros_like(self.parent)])
        ids = np.arange(self.count, self.count + n)
        self.parent[ids] = ids
        self.count += n
        self.owner.extend([owner] * n)
        return torch.from_numpy(ids.copy())

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        pairs = torch.stack([a.reshape(-1), b.reshape(-1)], 1)
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        for x, y in pairs.unique(dim=0).tolist():
            self.union(x, y)

    def union_all(self, t: torch.Tensor) -> None:
        u = t.unique().tolist()
        for x in u[1:]:
            self.union(u[0], x)

    def roots(self, t: torch.Tensor) -> torch.Tensor:
        p = self.parent[: self.count]
        while True:
            pp = p[p]
            if np.array_equal(pp, p):
                break
            p = pp
        self.parent[: self.count] = p
        return torch.from_numpy(p.copy())[t]


# ───────────────────────────── label-tensor helpers ─────────────────────────────
def compress(labels: torch.Tensor) -> torch.Tensor:
    """Shrink every dim along which the labels are constant to size 1."""
    for d in range(labels.dim()):
        if labels.shape[d] > 1 and bool((labels == labels.narrow(d, 0, 1)).all()):
            labels = labels.narrow(d, 0, 1)
    return labels.contiguous()


def varying_dims(labels: torch.Tensor) -> list[int]:
    return [d for d in range(labels.dim()) if labels.shape[d] > 1]


def fixed_like(value: Any) -> Any:
    """Labels saying 'all FIXED' for a value (tensor, or tuple/list of tensors)."""
    if isinstance(value, torch.Tensor):
        return torch.zeros([1] * value.dim(), dtype=torch.int64)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(fixed_like(v) for v in value)
    return None


def channel_vector(labels: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """1-D labels along `dim` (labels must not vary along any other dim)."""
    v = labels.movedim(dim, 0).reshape(labels.shape[dim], -1)[:, 0]
    return v.expand(size).clone() if v.numel() == 1 else v.clone()


def _tensor_leaves(obj: Any) -> list:
    if isinstance(obj, (tuple, list)):
        return [x for o in obj for x in _tensor_leaves(o)]
    return [obj] if isinstance(obj, torch.Tensor) else []


# ───────────────────────────── op handler tables ─────────────────────────────
# Each handler: (analysis, node, value) -> labels of the node's value. Layers with weights are not here: their
# rules live in dyncompile.layer_rules.
Handler = Callable[["CouplingAnalysis", fx.Node, Any], Any]

UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    nn.Threshold, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.PReLU,  # with one weight (its layer rule declines it): an element-wise activation
)
SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
)
REARRANGE_MODULES = (nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)

UNARY_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
    F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.sigmoid, torch.sigmoid, torch.tanh, F.tanh, F.softplus,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.clamp, torch.clip, torch.abs,
    torch.neg, torch.exp, torch.square, torch.sqrt, torch.erf, operator.neg, F.logsigmoid, torch.clamp_min,
}
UNARY_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_max",
    "clip", "abs", "neg", "exp", "sqrt", "square", "contiguous", "clone", "detach", "float", "double", "half",
    "to", "type_as", "hardswish", "erf",
}
SPATIAL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool1d, F.lp_pool2d, F.interpolate, F.upsample,
    torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d,
}
REARRANGE_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.movedim,
    torch.squeeze, torch.unsqueeze, torch.cat, torch.concat, torch.concatenate, torch.stack, torch.split,
    torch.chunk, torch.tensor_split, torch.unbind, torch.narrow, torch.index_select, torch.flip, torch.roll,
    torch.t, F.pad, F.pixel_shuffle, F.pixel_unshuffle, F.channel_shuffle, torch.channel_shuffle,
    torch.pixel_shuffle, torch.pixel_unshuffle, torch.unflatten, operator.getitem, torch.repeat_interleave,
}
REARRANGE_METHODS = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "movedim", "squeeze",
    "unsqueeze", "expand", "expand_as", "repeat", "split", "chunk", "unbind", "narrow", "index_select",
    "flip", "roll", "t", "view_as", "reshape_as", "tensor_split", "repeat_interleave",
}
ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.subtract,
    torch.mul, torch.multiply, torch.div, torch.divide, torch.true_divide, torch.maximum, torch.minimum,
    torch.where, torch.pow,
}
ELEMENTWISE_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum", "where",
    "__add__", "__radd__", "__mul__", "__rmul__", "__sub__", "__rsub__", "__truediv__", "__iadd__",
}
# Constant-filled tensors whose sizes are arguments (a zero-padded shortcut: torch.zeros(b, c, h, w)).
FILL_FUNCTIONS = {torch.zeros, torch.ones, torch.full}
FILL_METHODS = {"new_zeros", "new_ones", "new_full"}


class Reduction(NamedTuple):
    """How an op that combines values along `dim` behaves when that dim holds droppable channels.

    The masked reference zeroes a dropped channel where it is produced; the extracted sub-net has no such
    channel at all. Along a dim where the labels do not vary every output position combines one class only
    (kept or dropped whole, and masked after), so any reduction is exact there. Across channels the op is
    exact only if a zero entry is the same as no entry: `exact` says so and `why` says why (or why not)."""

    dim_at: int  # position of `dim` in the node's args (the data is args[0], also for methods)
    default_dim: int | None  # `dim` when not given; None: every dim
    exact: bool  # across channels, masked zeros change nothing the sub-net would compute without them
    why: str  # the argument, in words (also the reason recorded when the channels are fixed)
    keeps_shape: bool = False  # output has the input's shape (cumsum, normalize, softmax): labels pass through
    order_at: int | None = None  # position of a norm's order p (exact only for p >= 0)
    dim_names: tuple[str, ...] = ("dim", "axis")
    rewrite: str | None = None  # not exact, but `extract` writes the masked semantics out (mean, max, min)


_SUM = Reduction(1, None, True, "a sum over channels: a masked channel adds 0, the sub-net adds nothing")
_MEAN = Reduction(1, None, False, "a mean over channels counts masked zeros: the sub-net divides its sum by the "
                  "full count", rewrite="mean")
_MAX = Reduction(1, None, False, "a max over channels: a masked 0 can win, so the sub-net clamps its max at 0 once "
                 "a channel is dropped", rewrite="max")
_MIN = Reduction(1, None, False, "a min over channels: a masked 0 can win, so the sub-net clamps its min at 0 once "
                 "a channel is dropped", rewrite="min")
_ARG = Reduction(1, None, False, "an arg-max/min over channels: a channel's index moves in a sub-net")
_VAR = Reduction(1, None, False, "var/std over channels: masked zeros move the mean and the count")
_NORM = Reduction(2, None, True, "a p-norm (p >= 0) over channels: |0|^p adds nothing", order_at=1)
# One entry per spelling: the torch function and the Tensor method of the same name share it.
REDUCTIONS: dict[Any, Reduction] = {
    "sum": _SUM, "nansum": _SUM,
    "count_nonzero": Reduction(1, None, True, "counting non-zeros over channels: a masked 0 is not counted"),
    "mean": _MEAN, "nanmean": Reduction(1, None, False, "a nanmean over channels counts masked zeros, a sub-net "
                                        "cannot tell how many were NaN"),
    "amax": _MAX, "max": _MAX, "amin": _MIN, "min": _MIN, "argmax": _ARG, "argmin": _ARG,
    "var": _VAR, "std": _VAR, "var_mean": _VAR, "std_mean": _VAR,
    "prod": Reduction(1, None, False, "a product over channels: a masked 0 zeroes it"),
    "logsumexp": Reduction(1, None, False, "logsumexp over channels: each masked 0 adds exp(0) = 1"),
    "norm": _NORM, "vector_norm": _NORM,
    "cumsum": Reduction(1, None, True, "a cumulative sum along channels: at a kept channel, masked ones before it "
                        "added 0", keeps_shape=True),
    "cumprod": Reduction(1, None, False, "a cumulative product along channels: a masked 0 zeroes what follows",
                         keeps_shape=True),
    "softmax": Reduction(1, None, False, "a softmax over channels: each masked 0 adds exp(0) to the denominator",
                         keeps_shape=True),
    "log_softmax": Reduction(1, None, False, "a log-softmax over channels: each masked 0 adds exp(0) to the "
                             "denominator", keeps_shape=True),
    "normalize": Reduction(2, 1, True, "F.normalize over channels: the p-norm (p > 0) ignores masked zeros and a "
                           "masked 0 divided stays 0", keeps_shape=True, order_at=1),
}
_REDUCTION_FUNCTIONS = {
    torch.sum: "sum", torch.nansum: "nansum", torch.count_nonzero: "count_nonzero", torch.mean: "mean",
    torch.nanmean: "nanmean", torch.amax: "amax", torch.amin: "amin", torch.max: "max", torch.min: "min",
    torch.argmax: "argmax", torch.argmin: "argmin", torch.var: "var", torch.std: "std", torch.var_mean: "var_mean",
    torch.std_mean: "std_mean", torch.prod: "prod", torch.logsumexp: "logsumexp", torch.norm: "norm",
    torch.linalg.vector_norm: "vector_norm", torch.cumsum: "cumsum", torch.cumprod: "cumprod",
    F.softmax: "softmax", torch.softmax: "softmax", F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax",
    F.normalize: "normalize",
}
_REDUCTION_METHODS = {name for name in REDUCTIONS if name not in ("normalize", "vector_norm", "var_mean", "std_mean")}
_REDUCTION_MODULES = {nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax"}
SHAPE_METHODS = {"size", "dim", "numel", "__len__", "get_device", "type", "ndimension", "nelement"}
SHAPE_FUNCTIONS = {getattr, len, torch.numel}


# ───────────────────────────── the analysis ─────────────────────────────
class CouplingAnalysis(fx.Interpreter):
    """Runs the graph on an example input, propagating channel labels beside the real values."""

    def __init__(self, gm: fx.GraphModule, grouped_conv_mode: str = "group"):
        super().__init__(gm)
        self.uf = ChannelUnionFind()
        self.labels: dict[fx.Node, Any] = {}
        self.grouped_conv_mode = grouped_conv_mode
        self.producers: dict[str, torch.Tensor] = {}  # producer node name -> its output atoms (1-D)
        self.events: list[tuple[str, str, list[int]]] = []  # (node, why, atoms tied) for the coupling graph
        self.fix_events: list[tuple[str, list[int]]] = []  # (why, atoms fixed)
        self.modules = dict(gm.named_modules())
        # A module (or parameter) used by several nodes has one weight, cut once by extraction: every use must
        # keep the same channels. Its atoms and input channels are remembered per target and reused / tied.
        self.atoms_of_target: dict[str, torch.Tensor] = {}
        self.inputs_of_target: dict[str, torch.Tensor] = {}

    # ── plumbing ──
    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        labels = self.label_node(n, value)
        self.labels[n] = labels
        n.meta[SHAPE] = _shape_of(value)
        return value

    def lab(self, arg: Any) -> Any:
        """Labels for an argument: recurses into lists/tuples; None for non-tensors."""
        if isinstance(arg, fx.Node):
            return self.labels.get(arg)
        if isinstance(arg, (tuple, list)):
            return type(arg)(self.lab(a) for a in arg)
        return None

    def val(self, arg: Any) -> Any:
        return fx.node.map_arg(arg, lambda n: self.env[n])

    def tie(self, a: torch.Tensor, b: torch.Tensor, node: fx.Node, why: str) -> None:
        a, b = torch.broadcast_tensors(a, b)
        self._record_tie(node, why, torch.cat([a.reshape(-1), b.reshape(-1)]).unique())
        self.uf.union_pairs(a, b)

    def tie_all(self, t: torch.Tensor, node: fx.Node, why: str) -> None:
        atoms = t.unique()
        self._record_tie(node, why, atoms)
        self.uf.union_all(atoms)

    def _record_tie(self, node: fx.Node, why: str, atoms: torch.Tensor) -> None:
        self.events.append((node.name, why, atoms.tolist()))
        if bool((self.uf.roots(atoms) == FIXED).any()):
            self._record_fix(f"tied by {_describe(node)} to channels kept whole", atoms)

    def fix(self, labels: Any, why: str) -> None:
        for t in _tensor_leaves(labels):
            atoms = t.unique()
            self._record_fix(why, atoms)
            self.uf.union_all(torch.cat([atoms, torch.zeros(1, dtype=torch.int64)]))

    def _record_fix(self, why: str, atoms: torch.Tensor) -> None:
        """Remember why: for every atom of the classes being fixed, not only the labels at hand."""
        all_roots = self.uf.roots(torch.arange(self.uf.count))
        roots = self.uf.roots(atoms)
        members = torch.isin(all_roots, roots[roots != FIXED]).nonzero().flatten()  # already-fixed keep their reason
        self.fix_events.append((why, members.tolist()))

    def roots(self, labels: torch.Tensor) -> torch.Tensor:
        return compress(self.uf.roots(labels))

    def rectangular(self, labels: torch.Tensor, node: fx.Node) -> torch.Tensor:
        """Enforce 'varies along at most one dim' by tying along the others (see module docstring)."""
        labels = self.roots(labels)
        dims = varying_dims(labels)
        if len(dims) <= 1:
            return labels
        keep = max(dims, key=lambda d: (labels.shape[d], d))
        rows = labels.movedim(keep, 0).reshape(labels.shape[keep], -1)
        for row in rows:
            self.tie_all(row, node, "reshape ties channel positions across the other dims")
        return self.roots(labels)

    # ── dispatch ──
    def label_node(self, n: fx.Node, value: Any) -> Any:
        if n.op == "placeholder":
            return fixed_like(value)
        if n.op == "get_attr":
            return self.label_constant(n, value)
        if n.op == "output":
            self.fix(self.lab(n.args[0]), f"network output ({_describe(n.args[0])})")
            return None
        handler = self.handler_for(n)
        if handler is None or (n.op != "call_method" and not n.args):  # data by a keyword positional_data missed
            return self.unknown(n, value)
        return handler(self, n, value)

    def handler_for(self, n: fx.Node) -> Handler | None:
        if n.op == "call_module":
            m = self.modules[n.target]
            rule = layer_rule_for(m)
            if rule is not None:
                return lambda a, node, value: rule.couple(a, node, m, value)
            if not has_torch_forward(m):
                return None  # a user subclass with its own forward: whatever it computes, it is not the layer
            if isinstance(m, UNARY_MODULES):
                return _unary
            if isinstance(m, SPATIAL_MODULES):
                return _spatial
            if isinstance(m, REARRANGE_MODULES):
                return _rearrange
            if type(m) in _REDUCTION_MODULES:
                return _reduce
            return None
        if n.op == "call_function":
            table = _FUNCTION_HANDLERS
        else:
            table = _METHOD_HANDLERS
        try:
            return table.get(n.target)
        except TypeError:  # unhashable target
            return None

    # ── what layer rules (dyncompile.layer_rules) use ──
    def input_channels(self, n: fx.Node, dim: int, why: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels of `n`'s data input and their 1-D vector along `dim`; labels varying along another dim are
        fixed first (a channel consumer cannot drop a spatial pattern)."""
        labels = _channel_only(self, n, _data_labels(self, n), dim, why)
        vector = channel_vector(labels, dim, self.val(n.args[0]).shape[dim])
        earlier = self.inputs_of_target.setdefault(n.target, vector) if n.op == "call_module" else vector
        if earlier is not vector:
            if len(earlier) != len(vector):
                self.fix((labels, earlier), f"{_describe(n)} is called again with another channel count")
            else:
                self.tie(earlier, vector, n, f"{_describe(n)} is called more than once: its weights are cut once")
            labels = self.roots(labels)
            vector = channel_vector(labels, dim, len(vector))
        return labels, vector

    def new_channels(self, n: fx.Node, count: int) -> torch.Tensor:
        """Atoms for the `count` output channels of producer `n`: fresh at a module's first call, the same ones
        at every later call (one weight, one cut)."""
        atoms = self.atoms_of_target.get(n.target)
        if atoms is None or len(atoms) != count:
            atoms = self.uf.new(count, n.target)
            self.atoms_of_target[n.target] = atoms
        self.producers[n.name] = atoms
        return atoms

    def channels_along(self, vector: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
        """Labels of a rank-`rank` value whose channels along `dim` are `vector`."""
        shape = [1] * rank
        shape[dim] = -1
        return self.roots(vector.reshape(shape))

    def describe(self, n: fx.Node) -> str:
        return _describe(n)

    # ── node kinds ──
    def label_constant(self, n: fx.Node, value: Any) -> Any:
        """Parameters used directly in forward (layer scales, biases) get atoms of their own."""
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.numel() > _MAX_PARAM_ATOMS:
            return fixed_like(value)
        atoms = self.atoms_of_target.get(n.target)
        if atoms is None or atoms.shape != value.shape:
            atoms = self.uf.new(value.numel(), f"param:{n.target}").reshape(value.shape)
            self.atoms_of_target[n.target] = atoms
        return self.rectangular(atoms, n)

    def unknown(self, n: fx.Node, value: Any) -> Any:
        args = self.lab((n.args, tuple(n.kwargs.values())))
        if _tensor_leaves(args):
            self.fix(args, f"{_describe(n)} {n.meta.get(OPAQUE, 'is not understood by the analysis')}")
        return fixed_like(value)


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(tuple(v.shape) for v in value)
    return None


def _describe(n: Any) -> str:
    if not isinstance(n, fx.Node):
        return str(n)
    if n.op == "call_module":
        return f"module '{n.target}'"
    target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return f"{target} at node '{n.name}'"


def _data_labels(a: CouplingAnalysis, n: fx.Node) -> torch.Tensor:
    return a.lab(n.args[0])


def _channel_only(a: CouplingAnalysis, n: fx.Node, labels: torch.Tensor, dim: int, why: str) -> torch.Tensor:
    """Labels varying only along `dim` (else fix them: a channel consumer cannot drop a spatial pattern)."""
    dim = dim % labels.dim()
    if any(d != dim for d in varying_dims(labels)):
        a.fix(labels, f"{why}: channels vary along a non-channel dim")
        return a.roots(labels)
    return labels


# ── channel-preserving layers ──
def _unary(a: CouplingAnalysis, n: fx.Node, value: Any) -> Any:
    labels = _data_labels(a, n)
    if not isinstance(labels, torch.Tensor) or not isinstance(value, torch.Tensor):
        return a.unknown(n, value)
    return a.roots(labels.reshape(labels.shape if labels.dim() == value.dim() else [1] * value.dim()))


def _spatial(a: CouplingAnalysis, n: fx.Node, value: Any) -> Any:
    labels = _data_labels(a, n)
    if not isinstance(value, torch.Tensor) or not isinstance(labels, torch.Tensor) or value.dim() < 2:
        return a.unknown(n, value)
    labels = _channel_only(a, n, labels, 1, f"{_describe(n)}")
    vec = labels.reshape(labels.shape[0], labels.shape[1], -1)[:, :, :1]
    return vec.reshape([1, labels.shape[1]] + [1] * (value.dim() - 2))


# ── rearrangements: apply the very same op to the labels ──
def _rearrange(a: CouplingAnalysis, n: fx.Node, value: Any) -> Any:
    data = a.val(n.args[0]) if n.args else None
    if n.op == "call_function" and n.target is operator.getitem and not isinstance(data, torch.Tensor):
        inner = a.lab(n.args[0])
        if isinstance(inner, (tuple, list)):
            return inner[n.args[1]]
        return None  # indexing a size tuple, etc.
    labels0 = a.lab(n.args[0])
    full0 = _expand_labels(labels0, a.val(n.args[0]))
    if full0 is None or _per_element_counts(a, n):
        return a.unknown(n, value)
    _tie_for_fixed_factor_ops(a, n, full0)
    args = (full0,) + tuple(a.val(x) for x in n.args[1:])
    kwargs = {k: a.val(v) for k, v in n.kwargs.items()}
    n.meta[ARGS] = (args[1:], kwargs)  # concrete values: extraction rewrites sizes from these
    result = None
    for dtype in (torch.int64, torch.float64):  # float64 holds ids exactly; some ops (reflect pad) want it
        try:
            cast_args = (_cast(args[0], dtype),) + args[1:]
            if n.op == "call_module":
                result = a.modules[n.target](*cast_args, **kwargs)
            elif n.op == "call_method":
                result = getattr(cast_args[0], n.target)(*cast_args[1:], **kwargs)
            else:
                result = n.target(*cast_args, **kwargs)
            break
        except (RuntimeError, TypeError, NotImplementedError):
            continue
    if result is None:
        return a.unknown(n, value)
    if isinstance(result, torch.Tensor):
        return a.rectangular(result.to(torch.int64), n)
    return tuple(a.rectangular(r.to(torch.int64), n) for r in result)


def _per_element_counts(a: CouplingAnalysis, n: fx.Node) -> bool:
    """repeat_interleave with a tensor of counts: one count per channel, which extraction would not cut."""
    if n.target not in ("repeat_interleave", torch.repeat_interleave):
        return False
    repeats = n.kwargs.get("repeats", n.args[1] if len(n.args) > 1 else None)
    return isinstance(a.val(repeats), torch.Tensor)


_CHANNEL_SHUFFLES = (F.channel_shuffle, torch.channel_shuffle)
_PIXEL_SHUFFLES = (F.pixel_shuffle, torch.pixel_shuffle)


def _tie_for_fixed_factor_ops(a: CouplingAnalysis, n: fx.Node, labels: torch.Tensor) -> None:
    """Ops whose factor is an argument (not derived from the tensor) stay correct on fewer channels only if
    the kept channels keep that structure: channel_shuffle(g) needs the same positions in every group,
    pixel_shuffle(r) needs whole blocks of r² channels. roll(shift) is never correct on fewer channels along a
    dim where they vary: the shorter cycle wraps at another place, so those channels are fixed."""
    module = a.modules.get(n.target) if n.op == "call_module" else None
    target = n.target
    if target in ("roll", torch.roll):
        dims = a.val(n.kwargs.get("dims", n.args[2] if len(n.args) > 2 else None))
        dims = None if dims is None else [dims] if isinstance(dims, int) else list(dims)
        varying = varying_dims(a.roots(labels))
        if dims is None or any(d % labels.dim() in varying for d in dims):
            a.fix(labels, f"{_describe(n)} rolls channels by a constant: fewer channels wrap at another place")
        return
    if isinstance(module, nn.ChannelShuffle) or target in _CHANNEL_SHUFFLES:
        g = module.groups if module is not None else a.val(n.args[1] if len(n.args) > 1 else n.kwargs["groups"])
        per = labels.reshape(labels.shape[0], g, labels.shape[1] // g, -1)
        for j in range(per.shape[2]):
            a.tie_all(per[:, :, j], n, f"channel_shuffle({g}) keeps position {j} in every group")
    elif isinstance(module, nn.PixelShuffle) or target in _PIXEL_SHUFFLES:
        r = module.upscale_factor if module is not None else a.val(n.args[1] if len(n.args) > 1 else n.kwargs["upscale_factor"])
        blocks = labels.reshape(labels.shape[0], labels.shape[1] // (r * r), r * r, -1)
        for c in range(blocks.shape[1]):
            a.tie_all(blocks[:, c], n, f"pixel_shuffle({r}) moves {r * r} channels into one")


def _cast(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return type(x)(_cast(v, dtype) for v in x)


def _expand_labels(labels: Any, value: Any) -> Any:
    if isinstance(value, torch.Tensor) and isinstance(labels, torch.Tensor):
        return labels.expand(value.shape).contiguous()
    if isinstance(value, (tuple, list)) and isinstance(labels, (tuple, list)) and len(value) == len(labels):
        parts = [_expand_labels(lab, v) for lab, v in zip(labels, value)]
        return None if any(p is None for p in parts) else type(value)(parts)
    return None


# ── position-wise combinations ──
def _elementwise(a: CouplingAnalysis, n: fx.Node, value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return None  # arithmetic on sizes
    operands = [(a.val(x), a.lab(x)) for x in list(n.args) + list(n.kwargs.values())]
    operands = [(v, lab) for v, lab in operands if isinstance(v, torch.Tensor) and isinstance(lab, torch.Tensor)]
    if not operands:
        return fixed_like(value)
    out_shape = value.shape
    rank = len(out_shape)
    aligned = [(v, lab.reshape([1] * (rank - lab.dim()) + list(lab.shape))) for v, lab in operands]
    real_shapes = [[1] * (rank - v.dim()) + list(v.shape) for v, _ in aligned]
    # An operand broadcast along a dim where another operand's channels vary must stay whole.
    varying = {d for _, lab in aligned for d in varying_dims(lab)}
    tied = []
    for (v, lab), shape in zip(aligned, real_shapes):
        if any(shape[d] == 1 and out_shape[d] > 1 for d in varying):
            a.fix(lab, f"{_describe(n)} broadcasts it over varying channels")
        else:
            tied.append(lab)
    if not tied:
        return fixed_like(value)
    result = tied[0]
    for other in tied[1:]:
        a.tie(result, other, n, f"{_describe(n)} combines channels position-wise")
        result = torch.broadcast_tensors(result, other)[0]
    return a.rectangular(result, n)


def _reduce(a: CouplingAnalysis, n: fx.Node, value: Any) -> Any:
    """A reduction (or normalisation) along some dims; its argument per op is in `REDUCTIONS`.

    Dims where the labels do not vary are reduced position-wise. Across channels, an exact op (sum, p-norm,
    count_nonzero, cumsum, F.normalize) lets the channels through: a reducing one leaves nothing droppable in
    its output, a shape-keeping one keeps the labels. A mean, max or min is let through with `node.meta[REDUCED]`
    set: `extract` writes the masked semantics out (the sum over the kept channels divided by the full count;
    the max or min clamped at 0 once a channel is dropped, as the masked zeros would). Any other op fixes the
    channels with its reason."""
    labels = _data_labels(a, n)
    name = _reduction_name(a, n)
    if not isinstance(labels, torch.Tensor) or not isinstance(_first_tensor(value), torch.Tensor):
        return a.unknown(n, value)
    if isinstance(a.val(n.args[1]) if len(n.args) > 1 else None, torch.Tensor):
        return _elementwise(a, n, value)  # torch.max(x, y), x.min(y): element-wise
    rule = REDUCTIONS[name]
    rank = labels.dim()
    dims = _reduced_dims(a, n, rule, rank)
    across = dims is None or any(d in varying_dims(labels) for d in dims)
    if not across:
        out = labels if rule.keeps_shape else _reduced_labels(labels, dims, value)
        if out is not None:
            return out
        a.fix(labels, f"{_describe(n)}: its output shape does not follow from its arguments")
        return fixed_like(value)
    if rule.exact and dims is not None and _order_ok(a, n, rule):
        return labels if rule.keeps_shape else fixed_like(value)
    unsure = "its dims or its order are not constants the analysis can prove exact"
    if rule.rewrite is not None and dims is not None:
        unsure = _rewrite_obstacle(n, rule, dims, value)
        if unsure is None:
            n.meta[REDUCED] = (rule.rewrite, tuple(dims))
            return fixed_like(value)
    a.fix(labels, f"{_describe(n)} reduces across channels: " + (rule.why if rule.rewrite is None and not rule.exact
                                                                 else unsure))
    return a.roots(labels) if rule.keeps_shape else fixed_like(value)


def _rewrite_obstacle(n: fx.Node, rule: Reduction, dims: list[int], value: Any) -> str | None:
    """Why `extract` cannot write out the masked semantics of this mean/max/min, or None when it can: the
    count of a mean must not include the batch; of a (values, indices) pair only the values may be used."""
    if rule.rewrite == "mean" and 0 in dims:
        return "a mean over the batch dim too (its count changes with the batch)"
    if isinstance(value, (tuple, list)) and not all(
            u.op == "call_function" and (u.target is operator.getitem and u.args[1] == 0
                                         or u.target is getattr and u.args[1] == "values") for u in n.users):
        return f"the indices of the {rule.rewrite} over channels are used, and they move in a sub-net"
    return None


def _reduction_name(a: CouplingAnalysis, n: fx.Node) -> str:
    if n.op == "call_module":
        return _REDUCTION_MODULES[type(a.modules[n.target])]
    return n.target if n.op == "call_method" else _REDUCTION_FUNCTIONS[n.target]


def _reduced_dims(a: CouplingAnalysis, n: fx.Node, rule: Reduction, rank: int) -> list[int] | None:
    """The dims the op reduces, non-negative; None when they cannot be read (treated as unprovable)."""
    if n.op == "call_module":
        dim = a.modules[n.target].dim
    else:
        given = [n.kwargs[k] for k in rule.dim_names if k in n.kwargs]
        dim = given[0] if given else a.val(n.args[rule.dim_at]) if len(n.args) > rule.dim_at else rule.default_dim
    dims = [] if dim is None else list(dim) if isinstance(dim, (tuple, list)) else [dim]
    if not dims:
        return list(range(rank))
    if isinstance(dim, bool) or not all(isinstance(d, int) for d in dims):
        return None  # an older positional signature (std(x, unbiased)) or a non-constant dim
    return sorted({d % rank for d in dims})


def _order_ok(a: CouplingAnalysis, n: fx.Node, rule: Reduction) -> bool:
    """A norm's order p: |0|^p adds nothing for p >= 0 (p > 0 for F.normalize); 'fro' is p = 2."""
    if rule.order_at is None:
        return True
    given = [n.kwargs[k] for k in ("p", "ord") if k in n.kwargs]
    p = given[0] if given else a.val(n.args[rule.order_at]) if len(n.args) > rule.order_at else 2
    if p in (None, "fro"):
        p = 2
    return isinstance(p, (int, float)) and not isinstance(p, bool) and (p > 0 or (p == 0 and not rule.keeps_shape))


def _reduced_labels(labels: torch.Tensor, dims: list[int], value: Any) -> Any:
    """Labels of a position-wise reduction; every tensor of a tuple result (values, indices) gets them. None
    when the output's rank fits neither keepdim nor its absence."""
    out = labels
    first = _first_tensor(value)
    keepdim = first.dim() == labels.dim()
    for d in reversed(dims):
        out = out.narrow(d, 0, 1) if keepdim else out.select(d, 0)
    if out.dim() != first.dim():
        if out.numel() != 1:
            return None
        out = out.reshape([1] * first.dim())
    return tuple(out for _ in value) if isinstance(value, (tuple, list)) else out


def _first_tensor(value: Any) -> Any:
    leaves = _tensor_leaves(value)
    return leaves[0] if leaves else None


def _filled(a: CouplingAnalysis, n: fx.Node, value: Any) -> Any:
    """A constant-filled tensor: any of its channels can go, so each gets an atom of its own (tied to whatever
    it meets) and extraction shrinks its size argument to the channels kept."""
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[1] > _MAX_PARAM_ATOMS:
        return _no_labels(a, n, value)
    n.meta[ARGS] = (tuple(a.val(x) for x in n.args), {k: a.val(v) for k, v in n.kwargs.items()})
    return a.channels_along(a.uf.new(value.shape[1], f"const:{n.name}"), 1, value.dim())


def _no_labels(a: CouplingAnalysis, n: fx.Node, value: Any) -> Any:
    return None if not isinstance(value, torch.Tensor) else a.unknown(n, value)


_FUNCTION_HANDLERS: dict[Any, Handler] = {}
_METHOD_HANDLERS: dict[str, Handler] = {}
for _fns, _methods, _h in (
    (UNARY_FUNCTIONS, UNARY_METHODS, _unary),
    (SPATIAL_FUNCTIONS, set(), _spatial),
    (REARRANGE_FUNCTIONS, REARRANGE_METHODS, _rearrange),
    (ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS, _elementwise),
    (set(_REDUCTION_FUNCTIONS), _REDUCTION_METHODS, _reduce),
    (FILL_FUNCTIONS, FILL_METHODS, _filled),
    (SHAPE_FUNCTIONS, SHAPE_METHODS, _no_labels),
):
    _FUNCTION_HANDLERS.update(dict.fromkeys(_fns, _h))
    _METHOD_HANDLERS.update(dict.fromkeys(_methods, _h))


# ───────────────────────────── pass entry points ─────────────────────────────
def positional_data(gm: fx.GraphModule) -> fx.GraphModule:
    """In place: a call whose data is passed by keyword (`F.avg_pool2d(input=x, …)`, `self.pool(input=x)`,
    `torch.cat(tensors=…)`) gets it as its first positional argument, the same call. Every handler here and
    `extract` read a node's data as `args[0]`; fx keeps builtins' keywords as the user wrote them."""
    changed = False
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_module") or n.args or not n.kwargs:
            continue
        names = _first_parameter_names(gm.get_submodule(n.target).forward if n.op == "call_module" else n.target)
        given = [k for k in n.kwargs if k in names]
        if len(given) == 1:
            kwargs = dict(n.kwargs)
            n.args = (kwargs.pop(given[0]),)
            n.kwargs = kwargs
            changed = True
    if changed:
        gm.recompile()
    return gm


def _first_parameter_names(fn: Callable) -> set[str]:
    """The name(s) of `fn`'s first parameter, over all overloads of a torch builtin."""
    names = set()
    try:
        names.add(next(iter(inspect.signature(fn).parameters)))
    except (ValueError, TypeError, StopIteration):
        pass
    for signature in get_signature_for_torch_op(fn) or []:
        names.update(list(signature.parameters)[:1])
    return names


def analyse(gm: fx.GraphModule, input_shape: tuple[int, ...], grouped_conv_mode: str = "group") -> CouplingAnalysis:
    """Run the label propagation once (no DynGraph changes but `positional_data`): the raw analysis, for tests
    and debugging."""
    positional_data(gm)
    for node in gm.graph.nodes:
        node.meta.pop(REDUCED, None)  # an earlier run's (couple tries two grouped-conv modes)
    analysis = CouplingAnalysis(gm, grouped_conv_mode)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        analysis.run(torch.randn(*input_shape, generator=generator))
    return analysis


def couple(dg: DynGraph, grouped_conv_mode: str = "auto") -> DynGraph:
    """Annotate `dg.gm` with channel classes and fill `dg.coupling` and `dg.sets`."""
    if grouped_conv_mode not in GROUPED_CONV_MODES:
        raise ValueError(f"grouped_conv_mode must be one of {GROUPED_CONV_MODES}")
    modes = ["group", "position"] if grouped_conv_mode == "auto" and _has_grouped_convs(dg.gm) else (
        ["group"] if grouped_conv_mode == "auto" else [grouped_conv_mode])
    best = None
    for mode in modes:
        analysis = analyse(dg.gm, dg.input_shape, mode)
        free = _count_free_classes(analysis)
        if best is None or free > best[0]:
            best = (free, analysis)
    analysis = best[1]
    _write_back(dg, analysis)
    return dg


def producer_channel_classes(dg: DynGraph, producer: str) -> torch.Tensor:
    """Class id of every output channel of producer layer `producer` (module name), after `couple`."""
    node = [n for n in dg.gm.graph.nodes if n.op == "call_module" and n.target == producer][-1]
    dim = producer_rule_for(dg.gm.get_submodule(producer), producer).channel_dim
    return channel_vector(node.meta[LABELS], dim, node.meta[SHAPE][dim])


def producer_channel_groups(dg: DynGraph, channel_set: ChannelSet, producer: str) -> torch.Tensor:
    """Group index (in `channel_set.groups`) of every output channel of `producer`; -1 where none (fixed)."""
    group_of_class = {c: i for i, g in enumerate(channel_set.groups) for c in g}
    return torch.tensor([group_of_class.get(int(c), -1) for c in producer_channel_classes(dg, producer)])


def _has_grouped_convs(gm: fx.GraphModule) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups < m.in_channels for m in gm.modules())


def _count_free_classes(analysis: CouplingAnalysis) -> int:
    if not analysis.producers:
        return 0
    atoms = torch.cat(list(analysis.producers.values()))
    classes = analysis.uf.roots(atoms).unique()
    return int((classes != FIXED).sum())


def _write_back(dg: DynGraph, analysis: CouplingAnalysis) -> None:
    uf = analysis.uf
    for node in dg.gm.graph.nodes:
        labels = analysis.labels.get(node)
        if isinstance(labels, torch.Tensor):
            node.meta[LABELS] = compress(uf.roots(labels))
        elif isinstance(labels, tuple):
            node.meta[LABELS] = tuple(compress(uf.roots(t)) for t in labels)
        else:
            node.meta[LABELS] = None
    dg.num_classes = uf.count
    roots = uf.roots(torch.arange(uf.count))
    owners = uf.owner
    order = {n.name: i for i, n in enumerate(dg.gm.graph.nodes)}
    producer_names = sorted(analysis.producers, key=order.__getitem__)
    producer_target = {n.name: n.target for n in dg.gm.graph.nodes if n.name in analysis.producers}

    # The coupling graph: producers (by module name) are nodes; two are joined where they share a free class.
    graph = nx.Graph()
    for name in producer_names:
        graph.add_node(producer_target[name], channels=len(analysis.producers[name]), node=name)
    class_owners: dict[int, set[str]] = defaultdict(set)
    for atom in range(1, uf.count):
        root = int(roots[atom])
        if root != FIXED:
            class_owners[root].add(owners[atom])
    for owner_set in class_owners.values():
        members = sorted(owner_set)
        graph.add_nodes_from(m for m in members if m not in graph)
        for u, v in zip(members, members[1:]):
            graph.add_edge(u, v)
    for node_name, why, atoms in analysis.events:
        tied = sorted({owners[x] for x in atoms if x != FIXED})
        for u, v in zip(tied, tied[1:]):
            if graph.has_edge(u, v):
                graph.edges[u, v].setdefault("via", []).append(f"{node_name}: {why}")
    dg.coupling = graph

    fixed_reasons_by_owner: dict[str, list[str]] = defaultdict(list)
    for why, atoms in analysis.fix_events:
        for owner in sorted({owners[x] for x in atoms if x != FIXED}):
            if why not in fixed_reasons_by_owner[owner]:
                fixed_reasons_by_owner[owner].append(why)
    dg.fixed_reasons = sorted({why for why, _ in analysis.fix_events})

    sets = []
    target_order = list(dict.fromkeys(producer_target[p] for p in producer_names))  # a module called twice: once
    for component in nx.connected_components(graph):
        members = [t for t in target_order if t in component]
        if not members:
            continue  # only constants: nothing a sub-net can drop
        classes: list[int] = []
        seen: set[int] = set()
        # Counted on the first producer, like `channels` and `group_channels` (an SE expand on a concat of this
        # set's channels and the input has more outputs, the extra ones fixed: they are not this set's).
        fixed_count = int((roots[analysis.producers[graph.nodes[members[0]]["node"]]] == FIXED).sum())
        for target in members:
            for c in roots[analysis.producers[graph.nodes[target]["node"]]].tolist():
                if c != FIXED and c not in seen:
                    seen.add(c)
                    classes.append(c)
        extra = sorted(c for c, o in class_owners.items() if o & component and c not in seen)
        classes.extend(extra)
        reasons = sorted({r for t in component for r in fixed_reasons_by_owner.get(t, [])})
        sets.append(ChannelSet(
            name=members[0], producers=members, channels=graph.nodes[members[0]]["channels"],
            classes=classes, fixed_channels=fixed_count, fixed_reasons=reasons,
        ))
    sets.sort(key=lambda s: target_order.index(s.name))
    dg.sets = sets
