"""The blocked activation layout NCHW[b]c for CPU convolutions: `b` channels side by side, one vector register.

ONNX Runtime runs convolutions this way on x86 (16-channel blocks on AVX-512) and so did TVM's x86 templates: the
inner loop of a convolution then multiplies one input value, broadcast, by a vector of `b` output channels' weights
and adds into `b` accumulators held in registers. In plain NCHW the same loop reads weights `C·K·K` floats apart.

    mod = to_blocked_layout(lanes=16)(mod)      # Relax: conv2d in NCHW[b]c / OIHW[bi]i[bo]o, layouts propagated
    mod = LegalizeOps(BLOCKED_LEGALIZE)(mod)    # blocked conv2d → topi.nn.conv2d_NCHWc (default legalize can't);
                                                # depthwise → `depthwise_conv2d_nchwc` (topi's is x86-registered only)

The block of each conv is chosen from its own channel counts (`channel_block`), so a 12-channel sub-net layer gets
a 12-wide block instead of failing: the largest divisor of the channel count that fits the target's vector lanes.
Depthwise convolutions (groups = channels, one filter each) are blocked too. Element-wise ops between convs stay
blocked (ConvertLayout propagates the layout through them); ops that do not know the layout (other grouped convs,
a flatten) get a layout transform back to NCHW in front of them. Weight layout
transforms are arithmetic on weights only, so `LiftTransformParams` moves them to `<name>_transform_params`.
"""

from __future__ import annotations

import re
from typing import Any

from dyncompile.targets.llvm_common import largest_divisor

__all__ = ["channel_block", "clip_as_min_max", "to_blocked_layout", "depthwise_conv2d_nchwc",
           "legalize_blocked_conv2d", "BLOCKED_LEGALIZE", "DEPTHWISE_BLOCK"]

DEPTHWISE_BLOCK = "depthwise_conv2d_NCHWc"  # the name of `depthwise_conv2d_nchwc`'s reduction

BLOCKED = re.compile(r"^NCHW(\d+)c$")


def channel_block(channels: int, lanes: int) -> int:
    """The largest divisor of `channels` that is at most `lanes` (a block must divide the channel count)."""
    return largest_divisor(channels, lanes)


def clip_as_min_max() -> Any:
    """Relax pass: `clip(x, lo, hi)` (ReLU6, hard-tanh) as `minimum(maximum(x, lo), hi)`. ConvertLayout cannot
    carry a layout through clip: in MobileNetV2 every ReLU6 cost a transform back to NCHW and one forward again
    (about 1.3 of its 3.1 ms); element-wise minimum and maximum keep the layout and fuse into the conv."""
    import tvm
    from tvm import relax

    clip = tvm.ir.Op.get("relax.clip")

    @relax.expr_functor.mutator
    class ClipToMinMax(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not (isinstance(call, relax.Call) and call.op.same_as(clip)):
                return call
            x, lo, hi = call.args
            dtype = x.ty.dtype
            return relax.op.minimum(relax.op.maximum(x, relax.const(float(lo.value), dtype)),
                                    relax.const(float(hi.value), dtype))

    @tvm.transform.module_pass(opt_level=0, name="DyncompileClipAsMinMax")
    def rewrite(mod: Any, _ctx: Any) -> Any:
        mutator = ClipToMinMax(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gvar, mutator.visit_expr(func))
        return mutator.builder_.get()

    return rewrite


def to_blocked_layout(lanes: int) -> Any:
    """Relax pass: every ungrouped or depthwise 2-d convolution in NCHW[b]c, `b` = `channel_block(channels,
    lanes)` per side (clips first rewritten by `clip_as_min_max`, so the layout flows through them).

    Function by function: where TVM's ConvertLayout cannot carry a layout through some op (seen: a DenseNet's and
    a GhostNet's channel concatenations, "Invalid layout axis 16b"), that sub-net keeps NCHW, with a warning on
    the `dyncompile` logger, instead of failing the build."""
    import logging

    import tvm
    from tvm import relax

    def layouts(call: Any) -> dict:
        if call.op.name != "relax.nn.conv2d" or call.attrs.data_layout != "NCHW":
            return {}
        data, weight, groups = call.args[0].ty, call.args[1].ty, int(call.attrs.groups)
        channels, outputs = int(data.shape[1]), int(weight.shape[0])
        if groups == channels == outputs:  # depthwise: filter c reads channel c only
            block = channel_block(channels, lanes)
            return {"relax.nn.conv2d": [f"NCHW{block}c", f"OIHW1i{block}o", f"NCHW{block}c"]}
        if groups != 1:  # stays in NCHW; said explicitly, or it would inherit a blocked input's layout and fail
            return {"relax.nn.conv2d": ["NCHW", "OIHW", "NCHW"]}
        in_block, out_block = channel_block(channels, lanes), channel_block(outputs, lanes)
        return {"relax.nn.conv2d": [f"NCHW{in_block}c", f"OIHW{in_block}i{out_block}o", f"NCHW{out_block}c"]}

    convert = tvm.transform.Sequential([clip_as_min_max(), relax.transform.Normalize(),
                                        relax.transform.ConvertLayout({}, layout_cb=layouts)])

    @tvm.transform.module_pass(opt_level=0, name="DyncompileBlockedLayout")
    def per_function(mod: Any, _ctx: Any) -> Any:
        converted = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            try:
                converted[gvar] = convert(tvm.IRModule({gvar: func}, attrs=mod.attrs))[gvar]
            except (RuntimeError, ValueError, TypeError) as exc:  # TVM raises its errors as these
                logging.getLogger("dyncompile").warning(
                    "sub-net %s keeps its convolutions in NCHW (slower): the blocked layout could not be carried "
                    "through it (%s)", gvar.name_hint, str(exc).strip().splitlines()[0][:160])
        functions = dict(mod.functions_items())
        functions.update(converted)
        return tvm.IRModule(functions, attrs=mod.attrs)

    return per_function


def depthwise_conv2d_nchwc(data: Any, kernel: Any, strides: Any, padding: Any, dilation: Any,
                           out_dtype: str) -> Any:
    """TE compute of a depthwise conv in NCHW[b]c: data (N, C/b, H, W, b), kernel (C/b, 1, KH, KW, 1, b),
    padding (top, left, bottom, right)."""
    from tvm import te, topi

    _, _, height, width, _ = (int(d) for d in data.shape)
    _, _, kernel_h, kernel_w, _, _ = (int(d) for d in kernel.shape)
    (stride_h, stride_w), (dilation_h, dilation_w) = (int(s) for s in strides), (int(d) for d in dilation)
    top, left, bottom, right = (int(p) for p in padding)
    padded = topi.nn.pad(data, [0, 0, top, left, 0], [0, 0, bottom, right, 0], name="data_pad")
    out_h = (height + top + bottom - dilation_h * (kernel_h - 1) - 1) // stride_h + 1
    out_w = (width + left + right - dilation_w * (kernel_w - 1) - 1) // stride_w + 1
    ry = te.reduce_axis((0, kernel_h), name="ry")
    rx = te.reduce_axis((0, kernel_w), name="rx")
    return te.compute(
        (data.shape[0], data.shape[1], out_h, out_w, data.shape[4]),
        lambda n, c, y, x, b: te.sum(
            padded[n, c, y * stride_h + ry * dilation_h, x * stride_w + rx * dilation_w, b].astype(out_dtype)
            * kernel[c, 0, ry, rx, 0, b].astype(out_dtype), axis=[ry, rx]),
        name=DEPTHWISE_BLOCK)


def legalize_blocked_conv2d(bb: Any, call: Any) -> Any:
    """Lower a blocked conv2d to `topi.nn.conv2d_NCHWc` (depthwise: `depthwise_conv2d_nchwc`); any other
    conv2d the default way."""
    import tvm
    from tvm import topi

    attrs = call.attrs
    if not (BLOCKED.match(attrs.data_layout) and BLOCKED.match(attrs.out_layout)):
        return tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")(bb, call)
    out_dtype = attrs.out_dtype if str(attrs.out_dtype) else call.args[0].ty.dtype
    if int(attrs.groups) != 1:
        return bb.call_te(depthwise_conv2d_nchwc, call.args[0], call.args[1], attrs.strides, attrs.padding,
                          attrs.dilation, str(out_dtype), primfunc_name_hint=DEPTHWISE_BLOCK)
    return bb.call_te(topi.nn.conv2d_NCHWc, call.args[0], call.args[1], attrs.strides, attrs.padding,
                      attrs.dilation, attrs.data_layout, attrs.out_layout, str(out_dtype),
                      primfunc_name_hint="conv2d_NCHWc")


BLOCKED_LEGALIZE = {"relax.nn.conv2d": legalize_blocked_conv2d}
