"""Default schedules for CPU kernels (cpu and arm): what a kernel gets when no tuning record covers it.

Untuned, a kernel compiles as plain single-threaded loops (76–169× slower than ONNX Runtime on a ResNet-18), so
the build gives every unscheduled kernel a schedule written for its kind:

    conv2d_NCHWc, depthwise (+ epilogue)  register-blocked direct convolution, the classic CPU recipe: a tile of
                                          `register_rows` output pixels × one channel block is accumulated in
                                          registers (broadcast input × weight vector), reduction over input-channel
                                          blocks and the kernel window, the epilogue (BN scale and shift, residual
                                          add, ReLU) applied to the tile while it is in registers, output rows
                                          in parallel
    one other reduction (+ epilogue)      dense layers, pooling: the innermost output loop tiled to a few vectors
                                          (pooling in NCHW[b]c: a row of pixels × one channel block) accumulated in
                                          registers, reduction loops outside it
    anything else                         leading spatial loops fused and run in parallel

    mod = default_schedules(target)(mod)   # a module pass; kernels already scheduled (tuned) are left alone

The rules are tried in that order, each on a fresh schedule; a kernel no rule fits keeps its plain loops (and
the build says so on the `dyncompile` logger).
Schedule primitives check their own legality, so a rule can fail but cannot make a kernel compute something else.
"""

from __future__ import annotations

import logging
from typing import Any

from dyncompile.targets.blocked_layout import DEPTHWISE_BLOCK
from dyncompile.targets.llvm_common import largest_divisor, vector_lanes
from dyncompile.targets.pipeline import is_scheduled

__all__ = ["default_schedules", "default_schedule", "register_rows", "CONV_BLOCKS"]

CONV_BLOCKS = ("conv2d_NCHWc", DEPTHWISE_BLOCK)  # the reductions of topi.nn.conv2d_NCHWc and of blocked depthwise


def register_rows(width: int, lanes: int) -> int:
    """Output pixels per register tile: the largest divisor of the row `width` that leaves registers for the
    weights (AVX-512 and NEON have 32 vector registers, AVX2 16)."""
    return largest_divisor(width, 7 if lanes <= 8 else 14)


def _spatial_count(sch: Any, block: Any) -> int:
    """How many leading loops of `block` are spatial (bound to data-parallel block vars)."""
    count = 0
    for var in sch.get(block).iter_vars:
        if int(var.iter_type) != 0:  # 0: kDataPar
            break
        count += 1
    return count


PAD_IN_PLACE_MAX_WINDOW = 9  # conv windows up to 3×3 read their padding in place; larger ones from a padded copy
PARALLEL_MIN_ELEMENTS = 4096  # below this a kernel's loops run on one thread: waking the pool costs more
PARALLEL_TASKS_PER_CORE = 16  # leading loops fused for `parallel` until they give this many tasks per core


def _parallel_spatial(sch: Any, block: Any, cores: int) -> None:
    """Run the block's leading spatial loops in parallel (when the work is worth waking the thread pool for),
    fused only until they give enough tasks: the loops inside stay nested, so the body does not recompute every
    index from one fused counter (ResNet-18's input NCHW → NCHW3c copy, 150K floats: 50 µs fully fused); vectorize
    a short innermost channel loop."""
    loops = sch.get_loops(block)
    spatial = loops[:min(_spatial_count(sch, block), len(loops))]
    if not spatial:
        return
    # keep the innermost spatial loop for vectorizing when it is a channel block or a short row
    inner = spatial[-1] if len(spatial) > 1 and _extent(sch, spatial[-1]) <= 64 else None
    candidates = spatial[:-1] if inner is not None else spatial
    elements = 1
    for loop in spatial:
        elements *= _extent(sch, loop)
    outer, tasks = [], 1
    for loop in candidates:
        outer.append(loop)
        tasks *= _extent(sch, loop)
        if tasks >= PARALLEL_TASKS_PER_CORE * cores:
            break
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if cores > 1 and _extent(sch, fused) >= 2 and elements >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(fused)
    if inner is not None and _extent(sch, inner) in (4, 8, 16) and len(spatial) == len(loops):
        sch.vectorize(inner)


def _extent(sch: Any, loop: Any) -> int:
    return int(sch.get(loop).extent)


def _around(sch: Any, reduction: Any) -> tuple[list, Any]:
    """The blocks before `reduction` (padding, transposes), and the one block its result flows into: the
    element-wise blocks after it are inlined into the last (a cache write when there are none)."""
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    names = [sch.get(b).name_hint for b in blocks]
    position = names.index(sch.get(reduction).name_hint)
    consumers = blocks[position + 1:]
    for block in consumers[:-1]:
        sch.compute_inline(block)
    return blocks[:position], consumers[-1] if consumers else sch.cache_write(reduction, 0, "global")


def _register_tile_epilogue(sch: Any, epilogue: Any, depth: int) -> None:
    """The epilogue's loops under the first `depth` (the tile's), unrolled with the innermost vectorized: the
    accumulators stay in registers only if every access to them has a constant index."""
    tile_loops = sch.get_loops(epilogue)[depth:]
    for loop in tile_loops[:-1]:
        sch.unroll(loop)
    if tile_loops:
        sch.vectorize(tile_loops[-1])


def _schedule_conv2d_nchwc(sch: Any, conv: Any, lanes: int, cores: int) -> None:
    producers, epilogue = _around(sch, conv)
    loops = sch.get_loops(conv)
    n, oc_chunk, oh, ow, oc_block = loops[:5]
    rows = register_rows(_extent(sch, ow), lanes)
    ow_outer, ow_inner = sch.split(ow, [None, rows])
    if len(loops) == 8:  # conv2d_NCHWc: reduce over input channels and the window
        ic, kh, kw = loops[5:]
        window = _extent(sch, kh) * _extent(sch, kw)
        data_block = int(sch.get(conv).reads[0].source.shape[-1])  # NCHW[b]c: the input's channel block
        ic_outer, ic_inner = sch.split(ic, [None, data_block])
        if rows < 8 and _extent(sch, oc_chunk) % 2 == 0:
            # short rows (7×7 maps): two channel blocks per tile, so each broadcast input feeds two FMAs and the
            # tile still has 2×rows accumulators (ResNet-18's last stage: 169 → 188 GFLOP/s)
            oc_chunk, oc_pair = sch.split(oc_chunk, [None, 2])
            sch.reorder(n, oc_chunk, oh, ow_outer, ic_outer, kh, ic_inner, kw, ow_inner, oc_pair, oc_block)
            sch.unroll(oc_pair)
        else:
            sch.reorder(n, oc_chunk, oh, ow_outer, ic_outer, kh, ic_inner, kw, ow_inner, oc_block)
        reduction_start = ic_outer
    else:  # depthwise: the window only (padding read in place: a copy was not measured there)
        kh, kw = loops[5:]
        window = 0
        sch.reorder(n, oc_chunk, oh, ow_outer, kh, kw, ow_inner, oc_block)
        reduction_start = kh
    parallel = sch.fuse(n, oc_chunk, oh)
    if cores > 1:
        sch.parallel(parallel)
    sch.reverse_compute_at(epilogue, ow_outer)
    # 3×3 windows read the padding in place (a bounds check the unrolled window mostly folds away): a separate
    # padded copy costs a second parallel region and a pass over memory, measured slower on ResNet-20 and on
    # ResNet-18's 512-channel 3×3 (1.06 → 1.24 ms). Larger windows pay for the copy: ResNet-18's 7×7 stride-2
    # stem 1.61 → 1.28 ms with it.
    for producer in producers:
        if sch.get(producer).name_hint == "data_pad" and window > PAD_IN_PLACE_MAX_WINDOW:
            _parallel_spatial(sch, producer, cores)
        else:
            sch.compute_inline(producer)
    sch.set_scope(conv, 0, "local")
    sch.vectorize(oc_block)
    sch.unroll(ow_inner)
    sch.unroll(kw)
    init = sch.decompose_reduction(conv, reduction_start)
    sch.vectorize(sch.get_loops(init)[-1])
    _register_tile_epilogue(sch, epilogue, 2)  # under (n·oc_chunk·oh fused, ow_outer)


def _schedule_reduction(sch: Any, reduction: Any, lanes: int, cores: int) -> None:
    """Any other reduction (a dense layer's matmul, global pooling): the innermost output loop is tiled to a few
    vectors accumulated in registers while the reduction loops run outside it, outer output loops in parallel."""
    producers, epilogue = _around(sch, reduction)
    for producer in producers:
        sch.compute_inline(producer)
    loops = sch.get_loops(reduction)
    spatial_count = _spatial_count(sch, reduction)
    spatial, reduce = loops[:spatial_count], loops[spatial_count:]
    if not spatial or not reduce or len(sch.get(reduction).iter_vars) != len(loops):
        raise ValueError("not a spatial-then-reduction loop nest")
    elements = 1
    for loop in spatial:
        elements *= _extent(sch, loop)
    last = _extent(sch, spatial[-1])
    tile = largest_divisor(last, 4 * lanes)
    tile_outer, tile_inner = sch.split(spatial[-1], [None, tile])
    # a blocked window reduction (max/avg pooling in NCHW[b]c: the innermost loop is one channel block): a row
    # of output pixels per tile too, so one loop over the window updates `rows` vectors held in registers
    # (ResNet-18's 3×3 stride-2 max-pool in isolation: 180 → 54 µs)
    rows = register_rows(_extent(sch, spatial[-2]), lanes) if len(spatial) > 1 and tile == last <= lanes else 1
    row_tile = []
    if rows > 1:
        row_outer, row_inner = sch.split(spatial[-2], [None, rows])
        spatial = [*spatial[:-2], row_outer]
        row_tile = [row_inner]
    else:
        spatial = spatial[:-1]
    sch.reorder(*spatial, tile_outer, *reduce, *row_tile, tile_inner)
    outer = sch.fuse(*spatial, tile_outer) if spatial else tile_outer
    if cores > 1 and _extent(sch, outer) >= 2 and elements >= PARALLEL_MIN_ELEMENTS // 16:
        sch.parallel(outer)
    sch.reverse_compute_at(epilogue, outer)
    sch.set_scope(reduction, 0, "local")
    sch.vectorize(tile_inner)
    for loop in row_tile:
        sch.unroll(loop)
    init = sch.decompose_reduction(reduction, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])
    _register_tile_epilogue(sch, epilogue, 1)


def _lanes_and_cores(target: Any) -> tuple[int, int]:
    return vector_lanes(target), int(target.attrs.get("num-cores", 1))


def default_schedule(kernel: Any, target: Any) -> Any | None:
    """The default schedule of `kernel` (a PrimFunc, or an IRModule holding it as "main") for `target` as a traced
    `tvm.s_tir.Schedule` (tuning enters its trace as a measured candidate), or None if no rule applies."""
    return _schedule(kernel, *_lanes_and_cores(target))


def _schedule(kernel: Any, lanes: int, cores: int) -> Any | None:
    from tvm.s_tir import Schedule, ScheduleError

    for rule in (_conv_rule, _reduction_rule, _spatial_rule):
        sch = Schedule(kernel)
        try:
            if rule(sch, lanes, cores):
                return sch
        except (ScheduleError, ValueError):
            continue  # a rule that does not fit this kernel; the next one starts from a fresh schedule
    return None


def _root_blocks(sch: Any) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _conv_rule(sch: Any, lanes: int, cores: int) -> bool:
    conv = next((b for b in _root_blocks(sch) if sch.get(b).name_hint.startswith(CONV_BLOCKS)), None)
    if conv is None:
        return False
    _schedule_conv2d_nchwc(sch, conv, lanes, cores)
    return True


def _reduction_rule(sch: Any, lanes: int, cores: int) -> bool:
    reductions = [b for b in _root_blocks(sch) if _spatial_count(sch, b) < len(sch.get(b).iter_vars)]
    if len(reductions) != 1:
        return False
    _schedule_reduction(sch, reductions[0], lanes, cores)
    return True


def _spatial_rule(sch: Any, lanes: int, cores: int) -> bool:
    for block in _root_blocks(sch):
        _parallel_spatial(sch, block, cores)
    return True


def default_schedules(target: Any) -> Any:
    """Module pass: every unscheduled kernel gets its default schedule for `target` and is marked scheduled."""
    import tvm

    lanes, cores = _lanes_and_cores(target)

    @tvm.transform.module_pass(opt_level=0, name="DyncompileDefaultSchedules")
    def apply(mod: Any, _ctx: Any) -> Any:
        updates, plain = {}, []
        for gvar, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            if is_scheduled(func):
                continue
            sch = _schedule(func, lanes, cores)
            if sch is not None:
                updates[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            else:
                plain.append(gvar.name_hint)
        if plain:
            logging.getLogger("dyncompile").warning(
                "%d kernel(s) fit no default CPU schedule and run as plain single-threaded loops: %s", len(plain),
                ", ".join(sorted(plain)[:8]))
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return apply
