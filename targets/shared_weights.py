"""Every sub-net reads its convolution and dense weights from ONE tensor per layer, the full model's, in place.

Without this, each sub-net's `_transform_params` made its own blocked copy of its slice at load: a ResNet-18
deployable of four widths held 2.4× its weights resident (issue 11's memory goal is 1.1×). Here a sub-net's
slice of a weight is a prefix of the full tensor along every dim (channel groups are kept as prefixes), so
its kernel can read the full tensor directly if that tensor is stored with the output channels innermost:

    conv weight  (O, I, KH, KW) stored as (O/B, I, KH, KW, B)  when every sub-net's conv uses output block B
                                       or (I, KH, KW, O)       otherwise; depthwise (C, 1, KH, KW) the second way
    dense weight (O, I)         stored as (I, O)

A blocked conv (NCHW[b]c, `blocked_layout.py`) then reads `store[oc_chunk, ic, kh, kw, oc_block]` (its block's
weights one contiguous run, as in a packed copy) or `store[ic, kh, kw, oc_chunk·b + oc_block]` (the `b` output
channels of its vector contiguous whatever the sub-net's width). The deployable stores each such tensor once in
that layout (`deployable.StoredLayout`) and `runtime.load` hands the same buffer to every sub-net.

    mod = share_weights()(mod)   # after blocked-layout, before lift-params; functions need FULL_SHAPES

A weight is shared only when every use of it is a conv or dense this pass rewrites; any other use keeps the
per-sub-net copy. The rewritten function records what it shares in its `SHARED` attribute (param → axes and
block; `shared_layouts` reads it).
"""

from __future__ import annotations

from typing import Any

from dyncompile.deployable import StoredLayout
from dyncompile.targets.blocked_layout import BLOCKED, DEPTHWISE_BLOCK

__all__ = ["FULL_SHAPES", "SHARED", "CONV_STORE_AXES", "DENSE_STORE_AXES", "share_weights", "shared_layouts",
           "conv2d_nchwc_from_store", "depthwise_nchwc_from_store", "dense_from_store"]

FULL_SHAPES = "dyncompile_full_shapes"  # function attr from import: weight param → full tensor's shape (prefix cuts)
SHARED = "dyncompile_shared_weights"  # function attr from this pass: weight param → [*axes, block or 0]
CONV_STORE_AXES = (1, 2, 3, 0)
DENSE_STORE_AXES = (1, 0)


def shared_layouts(func: Any) -> dict[str, StoredLayout]:
    """What `share_weights` shared in `func` (a Relax function): param name → layout of the stored tensor."""
    attrs = func.attrs
    if attrs is None or SHARED not in attrs:
        return {}
    layouts = {}
    for name, value in attrs[SHARED].items():
        *axes, block = (int(v) for v in value)
        layouts[str(name)] = StoredLayout(tuple(axes), block or None)
    return layouts


def _pad(data: Any, padding: tuple[int, int, int, int]) -> Any:
    from tvm import topi

    top, left, bottom, right = padding
    if not any(padding):
        return data
    return topi.nn.pad(data, [0, 0, top, left, 0], [0, 0, bottom, right, 0], name="data_pad")


def _int64(*values: int) -> tuple:
    """Shapes as int64 constants, as Relax's legalized kernels have them (FuseTIR requires the same buffer types)."""
    import tvm

    return tuple(tvm.tirx.const(int(v), "int64") for v in values)


class _Window:
    """The sliding window of a conv over blocked `data` (N, C/b, H, W, b) with a kernel of `kernel_shape`
    (·, KH, KW, ·): the padded input, the output size, the window's reduction axes, and where output pixel
    (y, x) reads at (kh, kw)."""

    def __init__(self, data: Any, kernel_shape: Any, strides: tuple, padding: tuple, dilation: tuple):
        from tvm import te

        _, _, height, width, _ = (int(d) for d in data.shape)
        _, kernel_h, kernel_w, _ = (int(d) for d in kernel_shape)
        (self.stride_h, self.stride_w), (self.dilation_h, self.dilation_w) = strides, dilation
        top, left, bottom, right = padding
        self.padded = _pad(data, padding)
        self.out_h = (height + top + bottom - self.dilation_h * (kernel_h - 1) - 1) // self.stride_h + 1
        self.out_w = (width + left + right - self.dilation_w * (kernel_w - 1) - 1) // self.stride_w + 1
        self.kh = te.reduce_axis((0, kernel_h), name="kh")
        self.kw = te.reduce_axis((0, kernel_w), name="kw")

    def row(self, y: Any) -> Any:
        return y * self.stride_h + self.kh * self.dilation_h

    def column(self, x: Any) -> Any:
        return x * self.stride_w + self.kw * self.dilation_w


def conv2d_nchwc_from_store(data: Any, store: Any, out_channels: int, out_block: int, strides: tuple,
                            padding: tuple, dilation: tuple, out_dtype: str) -> Any:
    """TE compute of a blocked conv (data N, C/b, H, W, b) reading the first `out_channels` outputs and the
    data's input channels of `store`: (O_full/out_block, I_full, KH, KW, out_block) or (I_full, KH, KW, O_full).
    The reduction is named like topi's `conv2d_NCHWc` so the default schedules and tuning treat it the same."""
    from tvm import te

    _, in_chunks, _, _, in_block = (int(d) for d in data.shape)
    blocked = len(store.shape) == 5
    w = _Window(data, store.shape[1:] if blocked else store.shape, strides, padding, dilation)
    ic = te.reduce_axis((0, in_chunks * in_block), name="ic")

    def weight(oc: Any, ob: Any) -> Any:
        return store[oc, ic, w.kh, w.kw, ob] if blocked else store[ic, w.kh, w.kw, oc * out_block + ob]

    return te.compute(
        (data.shape[0], *_int64(out_channels // out_block, w.out_h, w.out_w, out_block)),
        lambda n, oc, y, x, ob: te.sum(
            w.padded[n, ic // in_block, w.row(y), w.column(x), ic % in_block].astype(out_dtype)
            * weight(oc, ob).astype(out_dtype), axis=[ic, w.kh, w.kw]),
        name="conv2d_NCHWc")


def depthwise_nchwc_from_store(data: Any, store: Any, strides: tuple, padding: tuple, dilation: tuple,
                               out_dtype: str) -> Any:
    """TE compute of a blocked depthwise conv reading `store` (1, KH, KW, C_full) for the data's channels."""
    from tvm import te

    block = int(data.shape[4])
    w = _Window(data, store.shape, strides, padding, dilation)
    return te.compute(
        (data.shape[0], data.shape[1], *_int64(w.out_h, w.out_w, block)),
        lambda n, c, y, x, b: te.sum(
            w.padded[n, c, w.row(y), w.column(x), b].astype(out_dtype)
            * store[0, w.kh, w.kw, c * block + b].astype(out_dtype), axis=[w.kh, w.kw]),
        name=DEPTHWISE_BLOCK)


def dense_from_store(data: Any, store: Any, out_features: int, out_dtype: str) -> Any:
    """TE compute of `data` (N, K) times the first K rows and `out_features` columns of `store` (I_full, O_full)."""
    from tvm import te

    k = te.reduce_axis((0, int(data.shape[1])), name="k")
    return te.compute((data.shape[0], *_int64(out_features)),
                      lambda n, o: te.sum(data[n, k].astype(out_dtype) * store[k, o].astype(out_dtype), axis=k),
                      name="dense_from_store")


def _ints(values: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


class _Plan:
    """Which weight params of one function can be shared, found by reading its bindings once."""

    def __init__(self, func: Any, full_shapes: dict[str, tuple[int, ...]]):
        from tvm import relax

        self.params = {p: full_shapes[p.name] for p in func.params[int(func.attrs["num_input"]):]
                       if p.name in full_shapes}
        self.weight_of: dict[Any, Any] = {}  # var bound to the transformed weight → its param
        self.kind: dict[Any, str] = {}  # param → "conv" | "depthwise" | "dense"
        self.out_blocks: dict[Any, set[int]] = {}  # param of a conv → the output channel blocks it is read in
        rewritable: dict[Any, bool] = {p: True for p in self.params}
        for b in (b for block in func.body.blocks for b in block.bindings):
            value = b.value
            param = self._transform_of(value)
            if param is not None:
                self.weight_of[b.var] = param
                continue
            for position, var in self._vars(value):
                if var in self.params:
                    rewritable[var] = False  # used raw by something else
                elif var in self.weight_of:  # bindings come in order: its transform was seen above
                    p = self.weight_of[var]
                    kind = self._weight_use(value, position)
                    if kind is None or self.kind.get(p, kind) != kind:
                        rewritable[p] = False
                    else:
                        self.kind[p] = kind
                        if kind == "conv":
                            self.out_blocks.setdefault(p, set()).add(int(value.ty.shape[4]))
        for var in relax.analysis.free_vars(func.body.body):  # what the function returns
            if var in self.params:
                rewritable[var] = False
            elif var in self.weight_of:
                rewritable[self.weight_of[var]] = False
        self.shared = {p for p, ok in rewritable.items() if ok and p in self.kind}

    def _transform_of(self, value: Any) -> Any | None:
        """The param `value` transforms the way a blocked conv or dense wants it, or None."""
        import tvm
        from tvm import relax

        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            return None
        name = value.op.name
        if name == "relax.layout_transform" or (name == "relax.permute_dims" and value.attrs.axes is not None
                                                and _ints(value.attrs.axes) == (1, 0)):
            arg = value.args[0]
            return arg if arg in self.params else None
        return None

    @staticmethod
    def _vars(value: Any) -> list[tuple[int, Any]]:
        """(argument position, var) for every var `value` reads; a var inside a nested expression gets -1."""
        from tvm import relax

        if not isinstance(value, relax.Call):
            return [(-1, v) for v in relax.analysis.free_vars(value)]
        out = []
        for position, a in enumerate(value.args):
            if isinstance(a, relax.Var):
                out.append((position, a))
            else:
                out.extend((-1, v) for v in relax.analysis.free_vars(a))
        return out

    def _weight_use(self, call: Any, position: int) -> str | None:
        """"conv", "depthwise" or "dense" when `call` reads its argument `position` as a weight we rewrite."""
        if position != 1 or not hasattr(call.op, "name"):
            return None
        if call.op.name == "relax.nn.conv2d" and _conv_kind(call) is not None:
            return _conv_kind(call)
        if call.op.name == "relax.matmul" and len(call.args[0].ty.shape) == 2:
            return "dense"
        return None


def _conv_kind(call: Any) -> str | None:
    """"conv" / "depthwise" for a blocked conv2d `share_weights` can read from a store, else None."""
    attrs = call.attrs
    if not (BLOCKED.match(attrs.data_layout) and BLOCKED.match(attrs.out_layout)):
        return None
    groups = int(attrs.groups)
    if groups == 1:
        return "conv"
    data_channels = int(call.args[0].ty.shape[1]) * int(call.args[0].ty.shape[4])
    return "depthwise" if groups == data_channels else None


def _conv_blocks(plans: list[_Plan]) -> dict[str, int]:
    """Conv weights (by param name, the same in every sub-net) that every sub-net reads in one output block B
    dividing the full output channels: stored as (O/B, I, KH, KW, B), each block's weights one contiguous run."""
    blocks: dict[str, set[int]] = {}
    outputs: dict[str, int] = {}
    for plan in plans:
        for p in plan.shared:
            if plan.kind[p] == "conv":
                blocks.setdefault(p.name, set()).update(plan.out_blocks[p])
                outputs[p.name] = plan.params[p][0]
    return {name: next(iter(b)) for name, b in blocks.items() if len(b) == 1 and outputs[name] % next(iter(b)) == 0}


def _layout(kind: str, block: int | None) -> StoredLayout:
    return StoredLayout(DENSE_STORE_AXES if kind == "dense" else CONV_STORE_AXES, block if kind == "conv" else None)


def share_weights(rewrite: bool = True) -> Any:
    """Relax pass: in every function with `FULL_SHAPES`, blocked convs and dense layers whose weight is a prefix
    of a full-model tensor read that tensor (stored output channels innermost) instead of a transformed copy.
    `rewrite=False` (targets that keep their own layouts: cuda, or `--layout nchw`) only drops the attribute."""
    import tvm
    from tvm import relax, te

    @relax.expr_functor.mutator
    class ReadFromStore(relax.PyExprMutator):
        def __init__(self, mod: Any):
            super().__init__(mod)
            self.plan: _Plan | None = None
            self.stores: dict[Any, Any] = {}  # param → the new param holding the full stored tensor

        def visit_var_binding_(self, binding: Any) -> None:
            if binding.var in self.plan.weight_of and self.plan.weight_of[binding.var] in self.stores:
                return  # the transformed copy: no longer read by anything
            super().visit_var_binding_(binding)

        def visit_call_(self, call: Any) -> Any:
            weight = call.args[1] if len(call.args) > 1 else None
            param = self.plan.weight_of.get(weight) if weight is not None else None
            if param is None or param not in self.stores:
                return super().visit_call_(call)
            data, store = self.visit_expr(call.args[0]), self.stores[param]
            kind, out = self.plan.kind[param], call.ty
            out_dtype = str(out.dtype)
            placeholders = [te.placeholder(_int64(*_ints(data.ty.shape)), str(data.ty.dtype), "data"),
                            te.placeholder(_int64(*_ints(store.ty.shape)), str(store.ty.dtype), "store")]
            if kind == "dense":
                result = dense_from_store(*placeholders, int(out.shape[1]), out_dtype)
                name = "dense_from_store"
            else:
                attrs = call.attrs
                geometry = (_ints(attrs.strides), _ints(attrs.padding), _ints(attrs.dilation))
                if kind == "conv":
                    out_shape = _ints(out.shape)
                    result = conv2d_nchwc_from_store(*placeholders, out_shape[1] * out_shape[4], out_shape[4],
                                                     *geometry, out_dtype)
                    name = "conv2d_NCHWc"
                else:
                    result = depthwise_nchwc_from_store(*placeholders, *geometry, out_dtype)
                    name = DEPTHWISE_BLOCK
            if _ints(result.shape) != _ints(out.shape):
                raise ValueError(f"shared-weight {kind} gives shape {_ints(result.shape)}, expected {_ints(out.shape)}")
            prim = te.create_prim_func([*placeholders, result]).without_attr("global_symbol")
            gvar = self.builder_.add_func(prim, name)
            return relax.call_tir(gvar, [data, store], out_ty=relax.TensorType(out.shape, out_dtype))

        def rewrite(self, func: Any, plan: _Plan, blocks: dict[str, int]) -> Any:
            self.plan = plan
            self.stores = {}
            shared = {}
            for p in plan.shared:
                layout = _layout(plan.kind[p], blocks.get(p.name))
                self.stores[p] = relax.Var(p.name, relax.TensorType(layout.shape(plan.params[p]), str(p.ty.dtype)))
                shared[p.name] = [*layout.axes, layout.block or 0]
            if not shared:
                return None
            body = self.visit_with_new_scope(func.body)
            params = [self.stores.get(p, p) for p in func.params]
            attrs = dict(func.attrs.items()) if func.attrs is not None else {}
            attrs.pop(FULL_SHAPES, None)
            attrs[SHARED] = shared
            return relax.Function(params, body, func.ret_ty, func.is_pure,
                                  tvm.ir.make_node("ir.DictAttrs", **attrs), func.span)

    @tvm.transform.module_pass(opt_level=0, name="DyncompileShareWeights")
    def apply(mod: Any, _ctx: Any) -> Any:
        functions = [(gvar, func) for gvar, func in mod.functions_items()
                     if isinstance(func, relax.Function) and func.attrs is not None and FULL_SHAPES in func.attrs]
        plans = [_Plan(func, {str(k): _ints(v) for k, v in func.attrs[FULL_SHAPES].items()}) if rewrite else None
                 for _, func in functions]
        blocks = _conv_blocks([p for p in plans if p is not None])  # one decision for all sub-nets
        mutator = ReadFromStore(mod)
        for (gvar, func), plan in zip(functions, plans):
            new = mutator.rewrite(func, plan, blocks) if plan is not None else None
            mutator.builder_.update_func(gvar, new if new is not None else func.without_attr(FULL_SHAPES))
        return mutator.builder_.get()

    return apply
