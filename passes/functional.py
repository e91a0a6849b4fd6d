"""Pass `lift_functional_layers`: functional layer calls on the model's own tensors become the layers they are.

fx traces into a user subclass with its own forward (a pruned DenseNet's ``MaskedConv2d`` computing
``F.conv2d(x, self.weight * self.mask, self.bias, self.stride, …)``, timm's ``BatchNormAct2d`` calling
``F.batch_norm``, a classifier calling ``F.linear(x, self.weight, self.bias)``), so the graph holds a
`call_function` on `get_attr` nodes, which the coupling analysis cannot see into and keeps whole. This pass
rewrites each such call into a `call_module` of a real layer holding the very same Parameter and buffer
objects: nn.Conv1d/2d/3d, nn.Linear, nn.BatchNorm1d/2d/3d, nn.LayerNorm, nn.GroupNorm, or
`dyncompile.layers.ExprConv1d/2d/3d` / `ExprLinear` when the weight is an element-wise expression of the model's
tensors. Couple, rewrite, extract and verify then treat it through its layer rule, with the same guarantees.

A call is lifted only when all of these hold, else it stays as it is and ``node.meta[OPAQUE]`` says why (couple
reports that reason when it keeps the channels whole):

- its tensor operands are the model's tensors (`get_attr`); a conv's or linear's weight may also be an
  element-wise expression of them and numbers (`WEIGHT_EXPRESSION_OPS`). Element-wise functions commute with
  slicing, so a sub-net can cut the operands instead of the result; a standardised weight (mean and std over a
  filter) does not, so it stays opaque;
- its other arguments (stride, padding, groups, eps, training…) are constants;
- nothing else uses those tensors (a parameter shared by two calls, or with a module call, stays opaque);
- F.batch_norm does not use batch statistics in eval mode while holding running statistics.

The lifted layer takes the place of its owner module when it uses all of the owner's tensors, so the state-dict
names stay (``features.conv0.weight``, ``features.conv0.mask``); otherwise it becomes a new child named after
the call (``block.conv2d_1.weight``) and the tensors move into it.

    dg = lift_functional_layers(trace(model, (1, 3, 32, 32)))
    [n.target for n in dg.gm.graph.nodes if n.op == "call_module"]   # the lifted layers, by module name
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from dyncompile.ir import OPAQUE, DynGraph
from dyncompile.layers import (WEIGHT_EXPRESSION_OPS, ExprConv1d, ExprConv2d, ExprConv3d, ExprLinear,
                               evaluate_weight_expression)

__all__ = ["lift_functional_layers", "FunctionalLayer", "FUNCTIONAL_LAYERS"]


class _Opaque(Exception):
    """Why a call is not lifted (one phrase: "its stride is computed at run time")."""


# A layer built from the call's constants: (class, constructor kwargs), given the data input's shape (None if
# unknown) and the shapes of the tensor operands (None where absent).
LayerBuilder = Callable[[dict[str, Any], tuple[int, ...] | None, dict[str, tuple[int, ...] | None]],
                        tuple[type[nn.Module], dict[str, Any]]]


@dataclass(frozen=True)
class FunctionalLayer:
    """What one functional layer's call means: its parameter names in order (the first is the data input), which
    of them are tensors of the model (as the layer's attributes of the same names), and how to build the layer."""

    params: tuple[str, ...]
    tensors: tuple[str, ...]
    build: LayerBuilder
    expression_class: dict[type[nn.Module], type[nn.Module]] | None = None  # layers whose weight may be an expression


def _conv(dims: int) -> LayerBuilder:
    def build(c, input_shape, shapes):
        weight, groups = shapes["weight"], c.get("groups", 1)
        if weight is None or len(weight) != dims + 2:
            raise _Opaque(f"its weight is not a {dims}-d convolution kernel")
        kwargs = {name: c[name] for name in ("stride", "padding", "dilation") if name in c}
        return ((nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1],
                dict(in_channels=weight[1] * groups, out_channels=weight[0], kernel_size=tuple(weight[2:]),
                     groups=groups, bias=shapes["bias"] is not None, **kwargs))
    return build


def _linear(c, input_shape, shapes):
    weight = shapes["weight"]
    if weight is None or len(weight) != 2:
        raise _Opaque("its weight is not a matrix")
    return nn.Linear, dict(in_features=weight[1], out_features=weight[0], bias=shapes["bias"] is not None)


def _batch_norm(c, input_shape, shapes):
    tracked = shapes["running_mean"] is not None
    if tracked != (shapes["running_var"] is not None) or (shapes["weight"] is None) != (shapes["bias"] is None):
        raise _Opaque("it has only one of its running statistics or of its affine parameters")
    if c.get("training", False) and tracked:
        raise _Opaque("it normalises with batch statistics even in eval mode")
    if input_shape is None:
        raise _Opaque("its input's shape is unknown")
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(len(input_shape))
    if cls is None:
        raise _Opaque(f"its input has rank {len(input_shape)}")
    return cls, dict(num_features=input_shape[1], eps=c.get("eps", 1e-5), momentum=c.get("momentum", 0.1),
                     affine=shapes["weight"] is not None, track_running_stats=tracked)


def _layer_norm(c, input_shape, shapes):
    return nn.LayerNorm, dict(normalized_shape=tuple(c["normalized_shape"]), eps=c.get("eps", 1e-5),
                              elementwise_affine=shapes["weight"] is not None, bias=shapes["bias"] is not None)


def _group_norm(c, input_shape, shapes):
    if (shapes["weight"] is None) != (shapes["bias"] is None):
        raise _Opaque("it has a weight without a bias or a bias without a weight")
    if input_shape is None:
        raise _Opaque("its input's shape is unknown")
    return nn.GroupNorm, dict(num_groups=c["num_groups"], num_channels=input_shape[1], eps=c.get("eps", 1e-5),
                              affine=shapes["weight"] is not None)


_CONV_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_EXPRESSION_LAYERS = {nn.Conv1d: ExprConv1d, nn.Conv2d: ExprConv2d, nn.Conv3d: ExprConv3d, nn.Linear: ExprLinear}

# The registry: one entry per functional layer (a new one is one line).
FUNCTIONAL_LAYERS: dict[Callable, FunctionalLayer] = {
    F.conv1d: FunctionalLayer(_CONV_PARAMS, ("weight", "bias"), _conv(1), _EXPRESSION_LAYERS),
    F.conv2d: FunctionalLayer(_CONV_PARAMS, ("weight", "bias"), _conv(2), _EXPRESSION_LAYERS),
    F.conv3d: FunctionalLayer(_CONV_PARAMS, ("weight", "bias"), _conv(3), _EXPRESSION_LAYERS),
    F.linear: FunctionalLayer(("input", "weight", "bias"), ("weight", "bias"), _linear, _EXPRESSION_LAYERS),
    F.batch_norm: FunctionalLayer(
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        ("running_mean", "running_var", "weight", "bias"), _batch_norm),
    F.layer_norm: FunctionalLayer(("input", "normalized_shape", "weight", "bias", "eps"), ("weight", "bias"),
                                  _layer_norm),
    F.group_norm: FunctionalLayer(("input", "num_groups", "weight", "bias", "eps"), ("weight", "bias"),
                                  _group_norm),
}

# fx targets of the element-wise functions a weight expression may use → their name in WEIGHT_EXPRESSION_OPS
_ELEMENTWISE: dict[Any, str] = {
    **{fn: name for name, fn in WEIGHT_EXPRESSION_OPS.items()},
    torch.mul: "mul", torch.add: "add", torch.sub: "sub", torch.div: "div", torch.neg: "neg",
}
_ELEMENTWISE_METHODS = {**{name: name for name in WEIGHT_EXPRESSION_OPS}, "__mul__": "mul", "__rmul__": "mul"}


def lift_functional_layers(dg: DynGraph) -> DynGraph:
    """Rewrite every liftable functional layer call of `dg.gm` into a module call, in place (see module doc)."""
    gm = dg.gm
    if not any(n.op == "call_function" and n.target in FUNCTIONAL_LAYERS for n in gm.graph.nodes):
        return dg
    try:
        ShapeProp(gm).propagate(torch.randn(*dg.input_shape))  # the norms' input shapes
    except Exception:  # noqa: BLE001 - without shapes only the norms that need one stay opaque
        pass
    busy = _tensors_of_called_modules(gm)
    for node in list(gm.graph.nodes):
        layer = FUNCTIONAL_LAYERS.get(node.target) if node.op == "call_function" else None
        if layer is None:
            continue
        try:
            _lift(gm, node, layer, busy)
        except _Opaque as why:
            node.meta[OPAQUE] = f"is not lifted into a layer: {why}"
    gm.graph.lint()
    gm.recompile()
    return dg


def _lift(gm: fx.GraphModule, node: fx.Node, layer: FunctionalLayer, busy: set[int]) -> None:
    data, constants, args = _bind(node, layer)
    tensors, expression, leaves, inner = _operands(gm, layer, args)
    attrs = [n for n in tensors.values() if n is not None] + list(leaves.values())
    for n in attrs:
        if not isinstance(_fetch(gm, n.target), torch.Tensor):
            raise _Opaque(f"'{n.target}' is not a tensor")
    _check_exclusive(gm, attrs, [node, *inner], busy)
    module, slots = _layer(gm, layer, data, constants, tensors, expression, leaves)

    name = _install(gm, module, [n.target for n in slots.values()], node.name)
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(name, (data,))
    call.meta = {k: v for k, v in node.meta.items() if k != OPAQUE}
    node.replace_all_uses_with(call)
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in sorted({node, *inner, *attrs}, key=position.__getitem__, reverse=True):  # users before what they use
        if not n.users:
            gm.graph.erase_node(n)


def _bind(node: fx.Node, layer: FunctionalLayer) -> tuple[fx.Node, dict[str, Any], dict[str, Any]]:
    """(data input, constant arguments, every argument by name); raises _Opaque unless the constants are."""
    unknown = set(node.kwargs) - set(layer.params)
    if unknown or len(node.args) > len(layer.params):
        raise _Opaque(f"it is called with arguments it does not know ({sorted(unknown)})")
    args = {**dict(zip(layer.params, node.args)), **node.kwargs}
    data = args.get(layer.params[0])
    if not isinstance(data, fx.Node):
        raise _Opaque("its input is not a tensor of the graph")
    constants = {k: v for k, v in args.items() if k != layer.params[0] and k not in layer.tensors}
    for name, value in constants.items():
        if _has_node(value):
            raise _Opaque(f"its {name} is computed at run time")
    return data, constants, args


def _operands(gm: fx.GraphModule, layer: FunctionalLayer, args: dict[str, Any]
              ) -> tuple[dict[str, fx.Node | None], Any, dict[str, fx.Node], list[fx.Node]]:
    """(tensor operands by role: get_attr or None; the weight's expression or None; the expression's get_attrs
    by target; its steps). A weight that is a buffer (a fixed filter) is an expression of itself."""
    tensors: dict[str, fx.Node | None] = {}
    expression, leaves, inner = None, {}, []
    for role in layer.tensors:
        value = args.get(role)
        if (role == "weight" and layer.expression_class and isinstance(value, fx.Node) and value.op == "get_attr"
                and not isinstance(_fetch(gm, value.target), nn.Parameter)):
            expression = _expression(value, leaves, inner)
        elif value is None or (isinstance(value, fx.Node) and value.op == "get_attr"):
            tensors[role] = value
        elif role == "weight" and layer.expression_class:
            expression = _expression(value, leaves, inner)
        else:
            raise _Opaque(f"its {role} is not a tensor of the model")
    return tensors, expression, leaves, inner


def _layer(gm: fx.GraphModule, layer: FunctionalLayer, data: fx.Node, constants: dict[str, Any],
           tensors: dict[str, fx.Node | None], expression: Any, leaves: dict[str, fx.Node]
           ) -> tuple[nn.Module, dict[str, fx.Node]]:
    """The layer the call is, holding the model's own tensors, and which get_attr fills each of its slots."""
    if expression is not None:
        full = _evaluate(expression, lambda target: _fetch(gm, target))
        tensors["weight"] = leaves.pop(_base_operand(gm, leaves, full))
    shapes = {role: None if n is None else tuple(_fetch(gm, n.target).shape) for role, n in tensors.items()}
    if expression is not None:
        shapes["weight"] = tuple(full.shape)
    meta = data.meta.get("tensor_meta")
    cls, kwargs = layer.build(constants, tuple(meta.shape) if meta is not None else None, shapes)
    slots = {role: n for role, n in tensors.items() if n is not None}
    if expression is not None:
        cls = layer.expression_class[cls]
        names = _operand_names(cls, leaves)
        kwargs["weight_expression"] = _rename(expression, {tensors["weight"].target: "weight", **names})
        fixed = [] if isinstance(_fetch(gm, tensors["weight"].target), nn.Parameter) else [tensors["weight"].target]
        names.update({t: "weight" for t in fixed})
        kwargs["operands"] = tuple((names[t], isinstance(_fetch(gm, t), nn.Parameter), tuple(_fetch(gm, t).shape))
                                   for t in [*fixed, *leaves])
        slots.update({names[t]: n for t, n in leaves.items()})
    try:
        module = cls(**kwargs)
    except Exception as exc:  # noqa: BLE001 - constants the layer class refuses
        raise _Opaque(f"its constants make no {cls.__name__} ({type(exc).__name__}: {exc})") from None
    for slot, n in slots.items():
        _place(module, slot, _fetch(gm, n.target))
    return module.train(gm.training), slots


def _has_node(value: Any) -> bool:
    found = []
    fx.node.map_arg(value, lambda n: found.append(n))
    return bool(found)


def _expression(value: Any, leaves: dict[str, fx.Node], inner: list[fx.Node]) -> Any:
    """The weight as an expression tree over get_attr targets and numbers; raises _Opaque if it is not one."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if not isinstance(value, fx.Node):
        raise _Opaque(f"its weight uses {type(value).__name__} {value!r}")
    if value.op == "get_attr":
        leaves.setdefault(value.target, value)
        return value.target
    op = (_ELEMENTWISE.get(value.target) if value.op == "call_function" else
          _ELEMENTWISE_METHODS.get(value.target) if value.op == "call_method" else None)
    if op is None or value.kwargs:
        what = getattr(value.target, "__name__", value.target)
        raise _Opaque(f"its weight is computed by {what}, not element-wise from the model's tensors")
    inner.append(value)
    return [op, *(_expression(a, leaves, inner) for a in value.args)]


def _evaluate(expression: Any, fetch: Callable[[str], torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return evaluate_weight_expression(expression, fetch)


def _rename(expression: Any, names: dict[str, str]) -> Any:
    if isinstance(expression, str):
        return names[expression]
    if isinstance(expression, list):
        return [expression[0], *(_rename(a, names) for a in expression[1:])]
    return expression


def _base_operand(gm: fx.GraphModule, leaves: dict[str, fx.Node], full: torch.Tensor) -> str:
    """The operand that becomes the layer's `weight`: the first parameter with the weight's shape, else the first
    tensor with it. Every operand must broadcast to the weight without being expanded along a dim (so a cut cuts
    it alike)."""
    for target in leaves:
        t = _fetch(gm, target)
        aligned = (1,) * (full.dim() - t.dim()) + tuple(t.shape)
        if t.dim() > full.dim() or any(s not in (1, f) for s, f in zip(aligned, full.shape)):
            raise _Opaque(f"its weight's operand '{target}' {tuple(t.shape)} does not line up with the weight")
    full_shaped = [t for t in leaves if _fetch(gm, t).shape == full.shape]
    if not full_shaped:
        raise _Opaque("its weight expression has no tensor of the weight's shape")
    return next((t for t in full_shaped if isinstance(_fetch(gm, t), nn.Parameter)), full_shaped[0])


def _operand_names(cls: type[nn.Module], leaves: dict[str, fx.Node]) -> dict[str, str]:
    """Attribute names for the extra operands: their own leaf names where free (`mask`)."""
    taken = set(dir(cls)) | {"weight", "bias", "weight_expression", "operands"}
    names = {}
    for target in leaves:
        name, k = target.rpartition(".")[2], 1
        while name in taken:
            name, k = f"{target.rpartition('.')[2]}_{k}", k + 1
        names[target] = name
        taken.add(name)
    return names


def _check_exclusive(gm: fx.GraphModule, attrs: list[fx.Node], inner: list[fx.Node], busy: set[int]) -> None:
    """Every tensor the call (`inner[0]`) reads, and every step of its weight expression, serves this call only."""
    mine = set(inner) | set(attrs)
    for n in inner[1:] + attrs:
        if any(user not in mine for user in n.users):
            raise _Opaque(f"'{n.target if n.op == 'get_attr' else n.name}' is also used elsewhere (shared tensors "
                          f"are kept whole)")
    ids = {id(_fetch(gm, n.target)) for n in attrs}
    others = [n for n in gm.graph.nodes if n.op == "get_attr" and n not in mine]
    shared = [n.target for n in others if id(_fetch(gm, n.target)) in ids] + (["a module call"] if ids & busy else [])
    if shared:
        raise _Opaque(f"its tensors are also used by {shared[0]} (shared tensors are kept whole)")


def _tensors_of_called_modules(gm: fx.GraphModule) -> set[int]:
    return {id(t) for n in gm.graph.nodes if n.op == "call_module"
            for t in [*gm.get_submodule(n.target).parameters(), *gm.get_submodule(n.target).buffers()]}


def _place(module: nn.Module, slot: str, tensor: torch.Tensor) -> None:
    """Put the model's own tensor object into the new layer's slot (same shape; parameters stay parameters)."""
    if slot in module._parameters:
        if not isinstance(tensor, nn.Parameter):
            raise _Opaque(f"its {slot} is a buffer, where the layer holds a parameter")
        expected = module._parameters[slot]
        module._parameters[slot] = tensor
    else:
        expected = module._buffers[slot]
        module._buffers[slot] = tensor
    if expected is not None and expected.shape != tensor.shape:
        raise _Opaque(f"its {slot} has shape {tuple(tensor.shape)}, not {tuple(expected.shape)}")


def _install(gm: fx.GraphModule, module: nn.Module, targets: list[str], call_name: str) -> str:
    """Where the lifted layer goes: in place of the owner of its tensors when it holds nothing else, else a new
    child of that owner (or of the root) named after the call; its tensors leave their old places."""
    owners = {t.rpartition(".")[0] for t in targets}
    owner = owners.pop() if len(owners) == 1 else ""
    held = gm.get_submodule(owner) if owner else None
    if held is not None and not list(held.children()) and {id(t) for t in [*held.parameters(), *held.buffers()]} == {
            id(_fetch(gm, t)) for t in targets}:
        parent, _, leaf = owner.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, module)
        return owner
    for target in targets:
        parent, _, leaf = target.rpartition(".")
        delattr(gm.get_submodule(parent) if parent else gm, leaf)
    name, k = call_name, 1
    parent_module = held if held is not None else gm
    while hasattr(parent_module, name):
        name, k = f"{call_name}_{k}", k + 1
    parent_module.add_module(name, module)
    return f"{owner}.{name}" if owner else name


def _fetch(gm: nn.Module, target: str) -> Any:
    """The tensor (or module) a get_attr target names: one getattr per dotted part."""
    return operator.attrgetter(target)(gm)
