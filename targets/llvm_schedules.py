"""Default schedules for CPU kernels (cpu and arm): what a kernel gets when no tuning record covers it.

Untuned, a kernel compiles as plain single-threaded loops (76–169× slower than ONNX Runtime on a ResNet-18), so
the build gives every unscheduled kernel a schedule written for its kind:

    conv2d_NCHWc, depthwise (+ epilogue)  register-blocked direct convolution, the classic CPU recipe: a tile of
                                          `register_rows` output pixels × one channel block is accumulated in
                                          registers (broadcast input × weight vector), reduction over input-channel
                                          blocks and the kernel window, the epilogue (BN scale and shift, residual
                                          add, ReLU) applied to the tile while it is in registers, output rows
                                          in parallel
    anything else                         leading spatial loops fused and run in parallel

    mod = default_schedules(target)(mod)   # a module pass; kernels already scheduled (tuned) are left alone

A kernel a rule cannot handle (a TIR schedule primitive refuses it) keeps its plain loops: schedule primitives
check their own legality, so a rule can fail but cannot make a kernel compute something else.
"""

from __future__ import annotations

from typing import Any

__all__ = ["default_schedules", "default_schedule", "schedule_kernel", "register_rows", "CONV_BLOCKS"]

CONV_BLOCKS = ("conv2d_NCHWc", "depthwise_conv2d_NCHWc")  # reductions of topi.nn.conv2d_NCHWc, blocked depthwise


def register_rows(width: int, lanes: int) -> int:
    """Output pixels per register tile: the largest divisor of the row `width` that leaves registers for the
    weights (AVX-512 and NEON have 32 vector registers, AVX2 16)."""
    cap = 7 if lanes <= 8 else 14
    return max(d for d in range(1, min(width, cap) + 1) if width % d == 0)


def _spatial_count(sch: Any, block: Any) -> int:
    """How many leading loops of `block` are spatial (bound to data-parallel block vars)."""
    count = 0
    for var in sch.get(block).iter_vars:
        if int(var.iter_type) != 0:  # 0: kDataPar
            break
        count += 1
    return count


PARALLEL_MIN_ELEMENTS = 4096  # below this a kernel's loops run on one thread: waking the pool costs more


def _parallel_spatial(sch: Any, block: Any, cores: int) -> None:
    """Fuse the block's leading spatial loops and run them in parallel (when the work is worth waking the thread
    pool for); vectorize a short innermost channel loop."""
    loops = sch.get_loops(block)
    spatial = loops[:min(_spatial_count(sch, block), len(loops))]
    if not spatial:
        return
    # keep the innermost spatial loop for vectorizing when it is a channel block or a short row
    inner = spatial[-1] if len(spatial) > 1 and _extent(sch, spatial[-1]) <= 64 else None
    outer = spatial[:-1] if inner is not None else spatial
    elements = 1
    for loop in spatial:
        elements *= _extent(sch, loop)
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if cores > 1 and _extent(sch, fused) >= 2 and elements >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(fused)
    if inner is not None and _extent(sch, inner) in (4, 8, 16) and len(spatial) == len(loops):
        sch.vectorize(inner)


def _extent(sch: Any, loop: Any) -> int:
    return int(sch.get(loop).extent)


def _schedule_conv2d_nchwc(sch: Any, conv: Any, lanes: int, cores: int) -> None:
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in blocks]
    position = names.index(sch.get(conv).name_hint)
    # the epilogue: everything after the convolution collapses into its last block, which runs per register tile
    consumers = blocks[position + 1:]
    for block in consumers[:-1]:
        sch.compute_inline(block)
    if consumers:
        epilogue = consumers[-1]
    else:
        epilogue = sch.cache_write(conv, 0, "global")
    loops = sch.get_loops(conv)
    n, oc_chunk, oh, ow, oc_block = loops[:5]
    rows = register_rows(_extent(sch, ow), lanes)
    ow_outer, ow_inner = sch.split(ow, [None, rows])
    if len(loops) == 8:  # conv2d_NCHWc: reduce over input channels and the window
        ic, kh, kw = loops[5:]
        data_block = int(sch.get(conv).reads[0].source.shape[-1])  # NCHW[b]c: the input's channel block
        ic_outer, ic_inner = sch.split(ic, [None, data_block])
        sch.reorder(n, oc_chunk, oh, ow_outer, ic_outer, kh, ic_inner, kw, ow_inner, oc_block)
        reduction_start = ic_outer
    else:  # depthwise: the window only
        kh, kw = loops[5:]
        sch.reorder(n, oc_chunk, oh, ow_outer, kh, kw, ow_inner, oc_block)
        reduction_start = kh
    parallel = sch.fuse(n, oc_chunk, oh)
    if cores > 1:
        sch.parallel(parallel)
    sch.reverse_compute_at(epilogue, ow_outer)
    # the padding is read in place (a bounds check the unrolled window mostly folds away): a separate padded
    # copy costs a second parallel region and a pass over memory per kernel, measured slower on ResNet-20
    for producer in blocks[:position]:
        sch.compute_inline(producer)
    sch.set_scope(conv, 0, "local")
    sch.vectorize(oc_block)
    sch.unroll(ow_inner)
    sch.unroll(kw)
    init = sch.decompose_reduction(conv, reduction_start)
    sch.vectorize(sch.get_loops(init)[-1])
    # the tile's loops, unrolled: the accumulators stay in registers only if every access has a constant index
    tile_loops = sch.get_loops(epilogue)[2:]  # under (n·oc_chunk·oh fused, ow_outer)
    for loop in tile_loops[:-1]:
        sch.unroll(loop)
    if tile_loops:
        sch.vectorize(tile_loops[-1])


def default_schedule(kernel: Any, lanes: int, cores: int) -> Any | None:
    """The default schedule of `kernel` (a PrimFunc, or an IRModule holding it as "main") as a traced
    `tvm.s_tir.Schedule` (tuning enters its trace as a measured candidate), or None if no rule applies."""
    from tvm.s_tir import Schedule, ScheduleError

    sch = Schedule(kernel)
    blocks = {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}
    try:
        conv = next((b for name, b in blocks.items() if name.startswith(CONV_BLOCKS)), None)
        if conv is not None:
            _schedule_conv2d_nchwc(sch, conv, lanes, cores)
        else:
            for block in blocks.values():
                _parallel_spatial(sch, block, cores)
    except (ScheduleError, ValueError):
        return None
    return sch


def schedule_kernel(kernel: Any, lanes: int, cores: int) -> Any | None:
    """A scheduled copy of `kernel` (a PrimFunc), or None if no rule applies."""
    sch = default_schedule(kernel, lanes, cores)
    return None if sch is None else sch.mod["main"]


def default_schedules(target: Any, lanes: int) -> Any:
    """Module pass: every unscheduled kernel gets `schedule_kernel`'s schedule for `target` (`lanes` fp32
    vector lanes) and is marked scheduled."""
    import tvm

    cores = int(target.attrs.get("num-cores", 1))

    @tvm.transform.module_pass(opt_level=0, name="DyncompileDefaultSchedules")
    def apply(mod: Any, _ctx: Any) -> Any:
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
                continue
            scheduled = schedule_kernel(func, lanes, cores)
            if scheduled is not None:
                updates[gvar] = scheduled.with_attr("tirx.is_scheduled", True)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return apply
