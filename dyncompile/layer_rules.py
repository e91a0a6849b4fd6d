"""Everything dyncompile knows about one layer type, in one place: a registry of `LayerRule`s.

A rule answers, for one `nn.Module` class, the questions every pass asks about a layer:

- `couple(analysis, node, module, value)`: how the layer moves channels in the coupling analysis
  (`passes/couple.py`): which channels it produces, which it ties together, which it cannot drop;
- `extract(module, in_idx, out_idx)`: the layer cut down to the kept input/output channels (`passes/extract.py`);
- `channel_dim`: the dim of its input and output tensors that holds channels (Linear: -1; convs, norms: 1);
  `weight_out_dim`: the weight dim holding its output channels, where there is one (the search ranks by it);
- `slim_class`: its slimmable form in the converted model (`passes/rewrite.py`), if it has one.

`layer_rule_for(module)` walks the module's class hierarchy (MRO) for a registered class, but only up to the
class whose `forward` the module runs: a subclass with its own forward (timm's Conv2dSame) computes something
else than the layer the rule describes, so it stays opaque (its channels are kept whole) until a rule is
registered for the subclass itself. That matters for leaf modules: fx traces into a user subclass that is
not a leaf, and `passes/functional.py` lifts its `F.conv2d`/`F.batch_norm`/… calls into the layers they are
(`WeightExpressionRule` for a weight like ``self.weight * self.mask``). Activations, pooling and
rearrangements are not layer rules: they are the op handlers of `passes/couple.py`.

Adding a layer type is one registration. A user conv with its own weight, forward and a per-channel scale::

    import torch
    import torch.nn.functional as F
    from torch import nn
    from dyncompile.layer_rules import ConvRule, register_layer_rule
    from dyncompile.pipeline import analyse_model

    class ScaledConv2d(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.in_channels, self.out_channels, self.groups = cin, cout, 1
            self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
            self.bias = None
            self.scale = nn.Parameter(torch.ones(cout))

        def forward(self, x):
            return F.conv2d(x, self.weight, padding=1) * self.scale[:, None, None]

    class ScaledConvRule(ConvRule):  # a conv's coupling and cut, plus the scale of each output channel
        def extract(self, module, in_idx, out_idx):
            new = super().extract(module, in_idx, out_idx)
            new.scale = nn.Parameter(module.scale.detach()[out_idx].clone())
            return new

    register_layer_rule(ScaledConv2d, ScaledConvRule())
    model = nn.Sequential(ScaledConv2d(3, 8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    dg = analyse_model(model, (1, 3, 8, 8), groups=4, leaf_modules=("0",))  # a leaf: fx keeps it one call
    assert dg.sets[0].free  # without the rule its 8 channels would be fixed

`dyncompile.verify.verify(dg, [1.0, 0.5])` then checks the rule: full width exact, every extracted sub-net equal
to the masked model.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from dyncompile.errors import ConfigError, ExtractionError
from dyncompile.layers import (ExprConv1d, ExprConv2d, ExprConv3d, ExprLinear, SlimConv1d, SlimConv2d, SlimConv3d,
                               SlimConvTranspose1d, SlimConvTranspose2d, SlimConvTranspose3d, SlimLinear)

if TYPE_CHECKING:
    import torch.fx as fx

    from dyncompile.passes.couple import CouplingAnalysis

__all__ = ["LayerRule", "ProducerRule", "LinearRule", "ConvRule", "ConvTransposeRule", "ChannelwiseRule",
           "GroupNormRule", "PReLURule", "WeightExpressionRule", "LayerNormRule", "register_layer_rule",
           "unregister_layer_rule", "layer_rule_for", "producer_rule_for", "has_torch_forward"]


class LayerRule:
    """How one layer type moves channels. Subclass it (or one of the rules below) for a new layer type."""

    channel_dim: int = 1  # the channel dim of the layer's input and output tensors
    weight_out_dim: int | None = None  # the dim of `module.weight` holding output channels, if a single one does
    slim_class: type[nn.Module] | None = None  # its slimmable form in the converted model

    def applies_to(self, module: nn.Module) -> bool:
        """False for an instance that moves no channels (a one-weight PReLU): it is handled as an element-wise op."""
        return True

    def couple(self, a: CouplingAnalysis, node: fx.Node, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        """Tie what must move together (`a.tie_all`) and return the labels of the layer's output."""
        raise NotImplementedError

    def extract(self, module: nn.Module, in_idx: torch.Tensor, out_idx: torch.Tensor) -> nn.Module:
        """A copy of `module` keeping input channels `in_idx` and output channels `out_idx` (in order)."""
        raise NotImplementedError

    def computed_weight(self, module: nn.Module) -> torch.Tensor:
        """The weight the layer computes with (the search ranks output channels by its filters)."""
        return module.weight

    def inputs_read(self, module: nn.Module, in_idx: torch.Tensor, out_idx: torch.Tensor) -> torch.Tensor:
        """Of the kept input channels `in_idx`, those the cut layer still reads (all, but for a grouped conv
        that drops groups whose inputs are kept: extract gathers the others away before the layer)."""
        return in_idx


class ProducerRule(LayerRule):
    """Every output channel is new (linear, conv): each gets a fresh channel atom; the input is consumed whole
    along `channel_dim` (channels varying along another dim are fixed)."""

    def __init__(self, channel_dim: int = 1, kind: str = "layer", slim_class: type[nn.Module] | None = None):
        self.channel_dim, self.slim_class = channel_dim, slim_class
        self.kind = kind  # how messages name the layer

    def couple(self, a: CouplingAnalysis, node: fx.Node, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        _, inputs = a.input_channels(node, self.channel_dim, f"{self.kind} '{node.target}' input")
        outputs = a.new_channels(node, value.shape[self.channel_dim])
        self.tie(a, node, module, inputs, outputs)
        return a.channels_along(outputs, self.channel_dim, value.dim())

    def tie(self, a: CouplingAnalysis, node: fx.Node, module: nn.Module, inputs: torch.Tensor,
            outputs: torch.Tensor) -> None:
        """Ties between input and output channels (none: every output reads every input)."""


class LinearRule(ProducerRule):
    """nn.Linear: channels are the last dim; weight [out, in]."""

    weight_out_dim = 0

    def __init__(self) -> None:
        super().__init__(channel_dim=-1, kind="linear", slim_class=SlimLinear)

    def weight_index(self, module: nn.Linear, in_idx: torch.Tensor, out_idx: torch.Tensor) -> list[torch.Tensor]:
        """The kept indices along each dim of the weight."""
        return [out_idx, in_idx]

    def extract(self, module: nn.Linear, in_idx: torch.Tensor, out_idx: torch.Tensor) -> nn.Linear:
        new = _plain_copy(module)
        new.in_features, new.out_features = len(in_idx), len(out_idx)
        new.weight = nn.Parameter(_cut(module.weight.detach(), self.weight_index(module, in_idx, out_idx)).clone())
        _slice_bias(module, new, out_idx)
        return new


class ConvRule(ProducerRule):
    """nn.Conv1d/2d/3d (and convs alike: `in_channels`, `out_channels`, `groups`, weight [out, in/groups, k…]).

    A grouped conv ties its groups: per conv-group, inputs and outputs move together ("group" mode), or the same
    position in every group moves together ("position" mode, `a.grouped_conv_mode`)."""

    weight_out_dim = 0

    def __init__(self, slim_class: type[nn.Module] | None = None, kind: str = "conv"):
        super().__init__(channel_dim=1, kind=kind, slim_class=slim_class)

    def tie(self, a: CouplingAnalysis, node: fx.Node, module: nn.Module, inputs: torch.Tensor,
            outputs: torch.Tensor) -> None:
        g = module.groups
        if g == 1:
            return
        in_pg, out_pg = len(inputs) // g, len(outputs) // g
        if in_pg == 1 or a.grouped_conv_mode == "group":
            # Inputs already kept whole need no tie: a dropped group's fixed inputs are gathered away by extract
            # (`inputs_read`), and a kept group has them anyway. (Fixed stays fixed: the tie is never owed later.)
            # Not for a depthwise conv: dropping one of its outputs saves only that output's k² MACs a pixel, and
            # its outputs are not always channels (DiCENet's height-wise conv has one per row of a transposed map;
            # free rows would meet free channels in one tensor and tie everything into one class).
            free = a.uf.roots(inputs) != 0 if in_pg > 1 else torch.ones(len(inputs), dtype=torch.bool)
            for k in range(g):
                group_inputs = inputs[k * in_pg:(k + 1) * in_pg][free[k * in_pg:(k + 1) * in_pg]]
                a.tie_all(torch.cat([group_inputs, outputs[k * out_pg:(k + 1) * out_pg]]), node,
                          f"conv-group {k} of grouped {self.kind} '{node.target}' (in and out move together)")
        else:
            where = f"grouped {self.kind} '{node.target}'"
            for j in range(in_pg):
                a.tie_all(inputs[j::in_pg], node, f"{where}: input position {j} in every group")
            for j in range(out_pg):
                a.tie_all(outputs[j::out_pg], node, f"{where}: output position {j} in every group")

    def inputs_read(self, module: nn.Module, in_idx: torch.Tensor, out_idx: torch.Tensor) -> torch.Tensor:
        if module.groups == 1:
            return in_idx
        kept_groups = (out_idx // (module.out_channels // module.groups)).unique()
        return in_idx[torch.isin(in_idx // (module.in_channels // module.groups), kept_groups)]

    def cut_plan(self, module: nn.Module, in_idx: torch.Tensor, out_idx: torch.Tensor
                 ) -> tuple[list[torch.Tensor], int]:
        """(kept indices along the weight's first two dims, conv-groups kept); the kernel is never cut."""
        positions, groups = _grouped_cut(out_idx, in_idx, module.out_channels, module.in_channels, module.groups)
        return [out_idx, positions], groups

    def weight_index(self, module: nn.Module, in_idx: torch.Tensor, out_idx: torch.Tensor) -> list[torch.Tensor]:
        return self.cut_plan(module, in_idx, out_idx)[0]

    def extract(self, module: nn.Module, in_idx: torch.Tensor, out_idx: torch.Tensor) -> nn.Module:
        index, groups = self.cut_plan(module, in_idx, out_idx)
        return self._cut(module, in_idx, out_idx, _cut(module.weight.detach(), index), groups)

    def _cut(self, module: nn.Module, in_idx: torch.Tensor, out_idx: torch.Tensor, weight: torch.Tensor,
             groups: int) -> nn.Module:
        new = _plain_copy(module)
        new.in_channels, new.out_channels, new.groups = len(in_idx), len(out_idx), groups
        new.weight = nn.Parameter(weight.clone())
        _slice_bias(module, new, out_idx)
        return new


class ConvTransposeRule(ConvRule):
    """nn.ConvTranspose1d/2d/3d: a producer of `out_channels` like a conv (grouped ones tie alike), but the
    weight is [in, out/groups, k…]: no single weight dim holds the output channels when grouped."""

    weight_out_dim = None

    def __init__(self, slim_class: type[nn.Module] | None = None):
        super().__init__(slim_class=slim_class, kind="transposed conv")

    def cut_plan(self, module: nn.Module, in_idx: torch.Tensor, out_idx: torch.Tensor
                 ) -> tuple[list[torch.Tensor], int]:
        positions, groups = _grouped_cut(in_idx, out_idx, module.in_channels, module.out_channels, module.groups)
        return [in_idx, positions], groups


class WeightExpressionRule(ProducerRule):
    """A conv or linear whose weight is an element-wise expression of its tensors (`dyncompile.layers.ExprConv2d`,
    lifted from ``F.conv2d(x, self.weight * self.mask)``): it couples like `base`, and a cut keeps the same
    indices of every operand as of the weight, where the operand is not broadcast. Element-wise functions commute
    with slicing, so the cut layer computes exactly the cut of the full layer's weight."""

    def __init__(self, base: ConvRule | LinearRule):
        super().__init__(channel_dim=base.channel_dim, kind=base.kind)
        self.base, self.weight_out_dim = base, base.weight_out_dim

    def tie(self, a: CouplingAnalysis, node: fx.Node, module: nn.Module, inputs: torch.Tensor,
            outputs: torch.Tensor) -> None:
        self.base.tie(a, node, module, inputs, outputs)

    def inputs_read(self, module: nn.Module, in_idx: torch.Tensor, out_idx: torch.Tensor) -> torch.Tensor:
        return self.base.inputs_read(module, in_idx, out_idx)

    def extract(self, module: nn.Module, in_idx: torch.Tensor, out_idx: torch.Tensor) -> nn.Module:
        new = self.base.extract(module, in_idx, out_idx)
        index, rank = self.base.weight_index(module, in_idx, out_idx), module.weight.dim()
        operands = []
        for name, is_parameter, _ in module.operands:
            t = getattr(module, name)
            cut = _cut(t.detach(), index, rank).clone()
            new._parameters.pop(name, None)  # the base cut makes `weight` a parameter, also where it is a buffer
            new._buffers.pop(name, None)
            if is_parameter:
                new.register_parameter(name, nn.Parameter(cut, t.requires_grad))
            else:
                new.register_buffer(name, cut)
            operands.append((name, is_parameter, tuple(cut.shape)))
        new.operands = tuple(operands)
        return new

    def computed_weight(self, module: nn.Module) -> torch.Tensor:
        return module.effective_weight()  # a pruned filter is ranked by what is left of it


class LayerNormRule(LayerRule):
    """nn.LayerNorm normalises over its last dims. Channels (dim 1) among them are fixed: over fewer channels the
    mean and variance are another function (zeroed channels still count in the masked model), so nothing there
    can be dropped. Channels along a dim it does not normalise pass through, and its parameters (along the
    normalised dims) are never cut."""

    def couple(self, a: CouplingAnalysis, node: fx.Node, module: nn.LayerNorm, value: torch.Tensor) -> torch.Tensor:
        labels = a.lab(node.args[0])
        normalised = range(value.dim() - len(module.normalized_shape), value.dim())
        if any(labels.shape[d] > 1 for d in normalised):
            a.fix(labels, f"LayerNorm '{node.target}' normalises across channels")
            return a.roots(labels)
        return a.input_channels(node, self.channel_dim, a.describe(node))[0]

    def extract(self, module: nn.LayerNorm, in_idx: torch.Tensor, out_idx: torch.Tensor) -> nn.LayerNorm:
        return _plain_copy(module)


class ChannelwiseRule(LayerRule):
    """A per-channel layer (BatchNorm, InstanceNorm, PReLU): channels pass through along dim 1, and every
    per-channel parameter and buffer is cut to the kept ones."""

    def __init__(self, count_attr: str = "num_features"):
        self.count_attr = count_attr  # the attribute holding the channel count

    def couple(self, a: CouplingAnalysis, node: fx.Node, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        labels, _ = a.input_channels(node, self.channel_dim, a.describe(node))
        return labels

    def extract(self, module: nn.Module, in_idx: torch.Tensor, out_idx: torch.Tensor) -> nn.Module:
        new = _plain_copy(module)
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dim() >= 1 and p.shape[0] > 1:
                setattr(new, name, nn.Parameter(p.detach()[in_idx].clone(), p.requires_grad))
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.dim() >= 1 and b.shape[0] > 1:
                setattr(new, name, b[in_idx].clone())
        setattr(new, self.count_attr, len(in_idx))
        return new


class GroupNormRule(ChannelwiseRule):
    """nn.GroupNorm: each group of `num_channels / num_groups` channels is normalised together, so it moves
    together; a cut keeps whole groups."""

    def __init__(self) -> None:
        super().__init__("num_channels")

    def couple(self, a: CouplingAnalysis, node: fx.Node, module: nn.GroupNorm, value: torch.Tensor) -> torch.Tensor:
        labels, channels = a.input_channels(node, self.channel_dim, a.describe(node))
        per = module.num_channels // module.num_groups
        for k in range(module.num_groups):
            a.tie_all(channels[k * per:(k + 1) * per], node,
                      f"group {k} of GroupNorm '{node.target}' is normalised together")
        return a.roots(labels)

    def extract(self, module: nn.GroupNorm, in_idx: torch.Tensor, out_idx: torch.Tensor) -> nn.GroupNorm:
        new = super().extract(module, in_idx, out_idx)
        new.num_groups = len(in_idx) // (module.num_channels // module.num_groups)
        return new


class PReLURule(ChannelwiseRule):
    """nn.PReLU: one weight per channel; with a single weight it is an element-wise activation (no rule)."""

    def __init__(self) -> None:
        super().__init__("num_parameters")

    def applies_to(self, module: nn.PReLU) -> bool:
        return module.num_parameters > 1


# ───────────────────────────── the registry ─────────────────────────────
_RULES: dict[type[nn.Module], LayerRule] = {}


def register_layer_rule(module_type: type[nn.Module], rule: LayerRule) -> None:
    """Use `rule` for `module_type` and its subclasses that keep its forward (replaces an earlier rule)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_layer_rule expects an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, LayerRule):
        raise TypeError(f"register_layer_rule expects a LayerRule, got {rule!r}")
    _RULES[module_type] = rule


def unregister_layer_rule(module_type: type[nn.Module]) -> None:
    """Forget the rule registered for exactly `module_type` (its layers become opaque again)."""
    _RULES.pop(module_type, None)


def layer_rule_for(module: nn.Module) -> LayerRule | None:
    """The rule of the nearest registered class in `module`'s MRO whose forward the module runs, if any."""
    mro = type(module).__mro__
    for cls in mro[:_forward_owner(mro) + 1]:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule if rule.applies_to(module) else None
    return None


def producer_rule_for(module: nn.Module, name: str) -> LayerRule:
    """The rule of producer layer `name`, which the analysis slimmed; a one-line ConfigError if its rule is no longer
    registered (a user's rule must be registered in every process that uses the converted graph)."""
    rule = layer_rule_for(module)
    if rule is None:
        raise ConfigError(f"no layer rule is registered for layer '{name}' ({type(module).__name__}), which the "
                          f"conversion slimmed: call dyncompile.layer_rules.register_layer_rule for it first")
    return rule


def has_torch_forward(m: nn.Module) -> bool:
    """True when the module runs torch.nn's own forward (dyncompile's Slim* layers keep it)."""
    mro = type(m).__mro__
    return mro[_forward_owner(mro)].__module__.startswith("torch.nn.")


def _forward_owner(mro: tuple[type, ...]) -> int:
    """Index in `mro` of the class whose `forward` runs."""
    return next((i for i, cls in enumerate(mro) if "forward" in cls.__dict__), len(mro) - 1)


for _conv, _slim in ((nn.Conv1d, SlimConv1d), (nn.Conv2d, SlimConv2d), (nn.Conv3d, SlimConv3d)):
    register_layer_rule(_conv, ConvRule(_slim))
for _conv, _slim in ((nn.ConvTranspose1d, SlimConvTranspose1d), (nn.ConvTranspose2d, SlimConvTranspose2d),
                     (nn.ConvTranspose3d, SlimConvTranspose3d)):
    register_layer_rule(_conv, ConvTransposeRule(_slim))
register_layer_rule(nn.Linear, LinearRule())
for _expr, _base in ((ExprConv1d, ConvRule()), (ExprConv2d, ConvRule()), (ExprConv3d, ConvRule()),
                     (ExprLinear, LinearRule())):
    register_layer_rule(_expr, WeightExpressionRule(_base))
register_layer_rule(nn.LayerNorm, LayerNormRule())
for _norm in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    register_layer_rule(_norm, ChannelwiseRule())
register_layer_rule(nn.GroupNorm, GroupNormRule())
register_layer_rule(nn.PReLU, PReLURule())


# ───────────────────────────── cutting helpers ─────────────────────────────
def _plain_copy(module: nn.Module) -> nn.Module:
    """A copy with the class an extracted network carries: a layer running torch.nn's forward (a Slim* layer
    included) becomes its torch.nn class; a registered layer with its own forward keeps its class."""
    new = copy.deepcopy(module)
    if has_torch_forward(module):
        new.__class__ = next(cls for cls in type(module).__mro__ if cls.__module__.startswith("torch.nn"))
    return new


def _cut(t: torch.Tensor, index: list[torch.Tensor], rank: int | None = None) -> torch.Tensor:
    """`t` keeping `index[d]` along each dim d of the rank-`rank` weight it broadcasts to (aligned to its last
    dims, as broadcasting aligns); where `t` has size 1 it is broadcast, so nothing is cut there."""
    rank = t.dim() if rank is None else rank
    for d, idx in enumerate(index):
        td = d - (rank - t.dim())
        if td >= 0 and t.shape[td] > 1:
            t = t.index_select(td, idx)
    return t


def _slice_bias(module: nn.Module, new: nn.Module, out_idx: torch.Tensor) -> None:
    if getattr(module, "bias", None) is not None:
        new.bias = nn.Parameter(module.bias.detach()[out_idx].clone())


def _grouped_cut(major_idx: torch.Tensor, minor_idx: torch.Tensor, major: int, minor: int,
                 groups: int) -> tuple[torch.Tensor, int]:
    """The cut of a (transposed) conv weight [major, minor/groups, k…]: (kept positions inside a group along the
    minor dim, groups kept). Every kept group must keep the same minor positions and as many major channels."""
    major_pg, minor_pg = major // groups, minor // groups
    if groups == 1:
        return minor_idx, 1
    kept_groups = (major_idx // major_pg).unique()
    positions = None
    for k in kept_groups.tolist():
        local = minor_idx[(minor_idx >= k * minor_pg) & (minor_idx < (k + 1) * minor_pg)] - k * minor_pg
        if positions is not None and not torch.equal(local, positions):
            raise ExtractionError("grouped conv keeps different positions in different groups")
        positions = local
    if not torch.equal((kept_groups[:, None] * minor_pg + positions[None, :]).flatten(), minor_idx):
        raise ExtractionError("grouped conv channels do not match its kept groups")
    counts = torch.bincount(major_idx // major_pg, minlength=groups)[kept_groups]
    if not bool((counts == counts[0]).all()):
        raise ExtractionError("grouped conv keeps different channel counts per group")
    return positions, len(kept_groups)

