"""Import one sub-net into Relax: extract → inference form → torch.export → a Relax function + its weight recipe.

    func, record = import_subnet(dg, "w50", config)
    record.parameters     # per function input: the full-model tensor it is cut from (ParamSlice)

Weights are never compiled in: the function takes them as inputs, and each input's `ParamSlice` says which
full-model tensor it is cut from (index lists per dim, from `passes/extract.py`'s index probe). Only the
sub-net's own integer constants (index tensors from `extract`) are compiled in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from dyncompile.deployable import ParamSlice, StoredLayout, TensorSpec, own_tensor_key
from dyncompile.errors import DyncompileError, one_line
from dyncompile.ir import DynGraph, SubnetConfig, output_tensors
from dyncompile.measure import count_macs, count_params
from dyncompile.passes.extract import extract_with_indices
from dyncompile.targets.channel_order import ChannelOrder
from dyncompile.targets.shared_weights import FULL_SHAPES

__all__ = ["BuildError", "SubnetBuild", "ScaleShiftBatchNorm", "for_inference", "import_subnet"]


class BuildError(DyncompileError):
    """A sub-net could not be exported, imported or compiled (the message names the sub-net and the step)."""


@dataclass
class SubnetBuild:
    """What the build learned about one sub-net (the manifest's per-sub-net record is made from it)."""

    name: str
    config: SubnetConfig
    macs: int  # per image (batch 1), counted by dyncompile.measure
    params: int
    parameters: list[ParamSlice]  # the inputs of `<name>_transform_params` (or of `<name>`), in order
    outputs: tuple[TensorSpec, ...]  # what the function returns, in order (a dense-prediction model: several)
    embedded_bytes: int  # constants compiled into the library (index tensors), not weights
    import_s: float
    transform_function: str | None = None
    kernels: int = 0  # fused kernels the sub-net's function calls
    tuned_kernels: int = 0  # of those, how many got a schedule from the tuning database
    # tensors only this sub-net uses (its own BatchNorm statistics from search), already cut to its size,
    # keyed as its ParamSlice sources name them (`own_tensor_key`); the deployable stores them beside the full weights
    own_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    # inputs cut as a prefix of a full-model tensor along every dim: Relax name → the full tensor's shape (what
    # `targets/shared_weights.py` may read in place instead)
    full_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def function(self) -> str:
        return self.name

    def share(self, layouts: dict[str, StoredLayout]) -> None:
        """Inputs the prepared function reads as whole full-model tensors stored in `layouts[input]`
        (shared_weights.py): their recipes become that stored tensor, uncut."""
        parameters = []
        for p in self.parameters:
            layout = layouts.get(p.name)
            if layout is not None:
                full = self.full_shapes[p.name]
                p = ParamSlice(p.name, p.source, (None,) * len(full), layout.shape(full), p.dtype, layout)
            parameters.append(p)
        self.parameters = parameters


class ScaleShiftBatchNorm(nn.Module):
    """Inference BatchNorm written as x·scale + shift, with scale and shift computed from the parameters.

    TVM lifts scale/shift into `<name>_transform_params` (run once at load), so the conv epilogue is one
    multiply-add per element instead of subtract, divide, multiply, add. It is PyTorch's own CPU formula.
    The tensors keep their names, so they still map to the full model's state dict.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps = bn.eps
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(bn, name)
            self.register_parameter(name, None if t is None else nn.Parameter(t.detach().clone(), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.reshape(shape) + shift.reshape(shape)


def for_inference(sub: fx.GraphModule, full_names: set[str]) -> fx.GraphModule:
    """BatchNorms as scale/shift; every floating full-model buffer becomes a parameter (so a function input)."""
    for qualname, m in list(sub.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and not m.training:
            parent, _, leaf = qualname.rpartition(".")
            setattr(sub.get_submodule(parent) if parent else sub, leaf, ScaleShiftBatchNorm(m))
    for qualname, m in list(sub.named_modules()):
        for name, b in list(m._buffers.items()):
            full_name = f"{qualname}.{name}" if qualname else name
            if b is not None and b.is_floating_point() and full_name in full_names:
                del m._buffers[name]
                m.register_parameter(name, nn.Parameter(b.detach().clone(), requires_grad=False))
    return sub


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def import_subnet(dg: DynGraph, name: str, config: SubnetConfig, batch_size: int = 1, *,
                  own_tensors: dict[str, torch.Tensor] | None = None, order: ChannelOrder | None = None
                  ) -> tuple[Any, SubnetBuild]:
    """Extract sub-net `config`, export it and import it into Relax as a function called `name`.

    `own_tensors`: full-model tensors this sub-net has its own values for (its BN statistics from search);
    where they differ from `dg`'s, the sub-net's inputs point to its own copy (`SubnetBuild.own_tensors`).
    A tensor not cut from the full one by index lists (e.g. a grouped conv's weight slimmed by position) is
    stored as the sub-net's own copy too. `order`: the order the deployable stores the full tensors in
    (`channel_order.py`); the sub-net's inputs are then cut from, and ordered as, those stored tensors.
    """
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_exported_program

    start = time.perf_counter()
    shared, dg = dg, dg.with_tensors(own_tensors)
    full_names = set(dg.gm.state_dict())
    plain, recipes = extract_with_indices(dg, config, allow_non_slices=True)
    plain = plain.eval()
    macs, params = count_macs(plain, (1, *dg.input_shape[1:])), count_params(plain)  # before for_inference
    sub = for_inference(plain, full_names)
    x = torch.zeros((batch_size, *dg.input_shape[1:]), dtype=next(iter(dg.gm.parameters())).dtype)
    try:
        with torch.no_grad():
            y = sub(x)
        ep = torch.export.export(sub, (x,))
        mod, _ = detach_params(from_exported_program(ep, keep_params_as_input=True))
    except Exception as exc:  # noqa: BLE001 -- torch.export / the Relax importer raise anything
        raise BuildError(f"sub-net '{name}': export to Relax failed ({one_line(exc, 200)})") from exc
    try:
        outputs = tuple(TensorSpec(tuple(t.shape), _dtype_name(t)) for t in output_tensors(y))
    except TypeError:
        raise BuildError(f"sub-net '{name}' returns {type(y).__name__}; a sub-net must return a tensor or a "
                         f"tuple of tensors") from None
    func = mod["main"]
    kinds = torch.export.graph_signature.InputKind
    targets = {s.arg.name: s.target for s in ep.graph_signature.input_specs if s.kind is kinds.PARAMETER}
    num_input = int(func.attrs["num_input"])
    names = {}
    for var in func.params[num_input:]:
        source = targets.get(var.name)
        if source not in full_names:
            raise BuildError(f"sub-net '{name}': Relax input '{var.name}' is not a tensor of the full model")
        names[var.name] = source
    state = {k: v.detach() for k, v in sub.state_dict().items()}
    inputs = set(names.values())
    embedded = sum(t.numel() * t.element_size() for k, t in state.items() if k not in inputs)
    embedded += sum(t.numel() * t.element_size() for t in ep.constants.values() if isinstance(t, torch.Tensor))
    shared_state = shared.gm.state_dict()
    slices, own, full_shapes = [], {}, {}

    def stored(source: str) -> np.ndarray:
        """The full tensor as the deployable stores it (the order its recipes index)."""
        full = shared_state[source].numpy()
        return full if order is None else order.store(source, full)

    for relax_name, source in names.items():
        value = state[source]
        recipe = recipes.get(source)
        if recipe is not None and order is not None:
            value, recipe = order.reorder_values(source, recipe, value)
        index = None if recipe is None else tuple(None if i is None else tuple(int(v) for v in i) for i in recipe)
        s = None if index is None else ParamSlice(relax_name, source, index, tuple(value.shape), _dtype_name(value))
        # not cut by index lists, or the sub-net has its own values (search BN statistics): its own copy
        if s is None or (own_tensors and source in own_tensors
                         and not np.array_equal(s.cut(stored(source)), value.numpy())):
            key = own_tensor_key(name, source)
            own[key] = np.ascontiguousarray(value.numpy())
            s = ParamSlice(relax_name, key, (None,) * value.dim(), tuple(value.shape), _dtype_name(value))
        elif s.is_prefix():
            full_shapes[relax_name] = tuple(shared_state[source].shape)
        slices.append(s)
    record = SubnetBuild(
        name=name, config=dict(config), macs=macs, params=params, parameters=slices,
        outputs=outputs, embedded_bytes=embedded,
        import_s=time.perf_counter() - start, own_tensors=own, full_shapes=full_shapes)
    func = func.with_attr("global_symbol", name)
    if full_shapes:
        func = func.with_attr(FULL_SHAPES, {k: list(v) for k, v in full_shapes.items()})
    return func, record
