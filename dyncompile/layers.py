"""Layers of the converted (slimmable) model.

- `ChannelMask` zeroes the channels a sub-net drops, exactly where they are produced.
- `SlimConv1d/2d/3d`, `SlimConvTranspose1d/2d/3d`, `SlimLinear`: the original layers, carrying which channel set
  and group each output channel belongs to (what the search ranks and trains); at full width they compute
  exactly the original. Which layer becomes which is each layer rule's `slim_class` (`dyncompile.layer_rules`).
- `ExprConv1d/2d/3d`, `ExprLinear`: a conv/linear whose weight is an element-wise expression of its own tensors
  (`weight * mask`): what `passes/functional.py` lifts a functional call on such a weight into.

BatchNorm layers stay plain torch BatchNorm here: a sub-net's own statistics are recalibrated by the search
(`dyncompile.search.subnets.calibrate`) and stored with its result.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import nn

from dyncompile.graph_io import register_safe_module

__all__ = ["ChannelMask", "SlimConv1d", "SlimConv2d", "SlimConv3d", "SlimConvTranspose1d", "SlimConvTranspose2d",
           "SlimConvTranspose3d", "SlimLinear", "ExprConv1d", "ExprConv2d", "ExprConv3d", "ExprLinear",
           "WEIGHT_EXPRESSION_OPS", "evaluate_weight_expression"]


class ChannelMask(nn.Module):
    """Multiplies by 0/1 per channel class: `labels` (class ids, broadcastable) → `mask` for the active sub-net."""

    def __init__(self, labels: torch.Tensor):
        super().__init__()
        self.register_buffer("labels", labels.clone().to(torch.int64))
        self.register_buffer("mask", torch.ones(labels.shape))

    def set_keep(self, keep: torch.Tensor) -> None:
        self.mask.copy_(keep[self.labels].to(self.mask.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask

    def extra_repr(self) -> str:
        return f"shape={tuple(self.labels.shape)}"


class _SlimMixin:
    """Records the channel set of the layer's outputs and the group of every output channel (-1 = fixed)."""

    dyncompile_slimmable = True

    def init_groups(self) -> None:
        width = getattr(self, "out_channels", None) or self.out_features
        self.channel_set = ""
        self.register_buffer("out_group", torch.full((width,), -1, dtype=torch.int64))


def _slim_class(base: type[nn.Module], name: str) -> type[nn.Module]:
    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        self.init_groups()

    return type(name, (_SlimMixin, base), {"__init__": __init__, "__doc__": f"Slimmable {base.__name__}."})


SlimConv1d = _slim_class(nn.Conv1d, "SlimConv1d")
SlimConv2d = _slim_class(nn.Conv2d, "SlimConv2d")
SlimConv3d = _slim_class(nn.Conv3d, "SlimConv3d")
SlimConvTranspose1d = _slim_class(nn.ConvTranspose1d, "SlimConvTranspose1d")
SlimConvTranspose2d = _slim_class(nn.ConvTranspose2d, "SlimConvTranspose2d")
SlimConvTranspose3d = _slim_class(nn.ConvTranspose3d, "SlimConvTranspose3d")
SlimLinear = _slim_class(nn.Linear, "SlimLinear")


# ───────────────────────────── layers whose weight is an element-wise expression ─────────────────────────────
# What `passes/functional.py` lifts `F.conv2d(x, self.weight * self.mask, …)` into. Element-wise only: slicing
# commutes with an element-wise function (f(W)[idx] == f(W[idx])), so a sub-net that cuts the operands alike
# computes exactly the cut of the full weight, and training keeps applying the expression (a fixed 0/1 mask
# zeroes a weight's gradient where it is 0, so no weight it masks can come back).
WEIGHT_EXPRESSION_OPS = {
    "mul": operator.mul, "add": operator.add, "sub": operator.sub, "div": operator.truediv, "neg": operator.neg,
    "abs": torch.abs, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "exp": torch.exp, "relu": torch.relu,
    "square": torch.square, "sqrt": torch.sqrt, "sign": torch.sign,
}


def evaluate_weight_expression(expression, tensors) -> torch.Tensor:
    """`expression`: an operand name, a number, or ``[op, arg, …]`` with `op` from WEIGHT_EXPRESSION_OPS;
    `tensors(name)` returns an operand."""
    if isinstance(expression, str):
        return tensors(expression)
    if isinstance(expression, (list, tuple)):
        op, *args = expression
        return WEIGHT_EXPRESSION_OPS[op](*(evaluate_weight_expression(a, tensors) for a in args))
    return expression


def _check_expression(expression, names: set[str]) -> None:
    """Only known ops, own operands and numbers (a stored graph names them: nothing else may be reached)."""
    if isinstance(expression, str):
        if expression not in names:
            raise ValueError(f"weight expression names {expression!r}, which is not one of its operands")
    elif isinstance(expression, (list, tuple)):
        if not expression or expression[0] not in WEIGHT_EXPRESSION_OPS:
            raise ValueError(f"weight expression uses an unknown operation {str(expression)[:40]}")
        for arg in expression[1:]:
            _check_expression(arg, names)
    elif not isinstance(expression, (int, float)) or isinstance(expression, bool):
        raise ValueError(f"weight expression holds {type(expression).__name__}")


class _WeightExpressionMixin:
    """`weight_expression` over the module's own tensors (`weight` and the extra `operands`: (name, is a
    parameter, shape)) gives the weight the layer computes with. Naming `weight` among the operands makes it a
    buffer (a fixed filter)."""

    def init_operands(self, weight_expression, operands) -> None:
        self.weight_expression = weight_expression
        self.operands = tuple((str(n), bool(p), tuple(int(s) for s in shape)) for n, p, shape in operands)
        _check_expression(weight_expression, {"weight"} | {n for n, _, _ in self.operands})
        like = self.weight
        for name, is_parameter, shape in self.operands:
            t = torch.zeros(shape, dtype=like.dtype, device=like.device)
            if name == "weight":  # a fixed weight (a blur filter): a buffer in the weight's place
                del self.weight
            if is_parameter:
                self.register_parameter(name, nn.Parameter(t))
            else:
                self.register_buffer(name, t)

    def effective_weight(self) -> torch.Tensor:
        return evaluate_weight_expression(self.weight_expression, lambda name: getattr(self, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self, nn.Linear):
            return F.linear(x, self.effective_weight(), self.bias)
        return self._conv_forward(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={self.weight_expression!r}"


def _weight_expression_class(base: type[nn.Module], name: str) -> type[nn.Module]:
    def __init__(self, *args, weight_expression="weight", operands=(), **kwargs):
        base.__init__(self, *args, **kwargs)
        self.init_operands(weight_expression, operands)

    # the real parameter list, so a stored graph can rebuild the layer from its attributes (dyncompile.graph_io)
    signature = inspect.signature(base.__init__)
    extra = [inspect.Parameter(p, inspect.Parameter.KEYWORD_ONLY, default=d)
             for p, d in (("weight_expression", "weight"), ("operands", ()))]
    params = [p for p in signature.parameters.values() if p.name not in ("device", "dtype")]
    __init__.__signature__ = signature.replace(parameters=params + extra)
    cls = type(name, (_WeightExpressionMixin, base),
               {"__init__": __init__, "__doc__": f"{base.__name__} computing with an element-wise weight expression."})
    return register_safe_module(cls)


ExprConv1d = _weight_expression_class(nn.Conv1d, "ExprConv1d")
ExprConv2d = _weight_expression_class(nn.Conv2d, "ExprConv2d")
ExprConv3d = _weight_expression_class(nn.Conv3d, "ExprConv3d")
ExprLinear = _weight_expression_class(nn.Linear, "ExprLinear")
