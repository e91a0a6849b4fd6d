"""The compile pipeline shared by every target: the prepare pass list, applying tuning records, lowering.

    mod = prepare(tvm.IRModule(functions), target)          # PREPARE_PASSES, in order
    mod = apply_database(mod, target, tuning_dir)           # after `tuning.tune`, if it ran
    executable = compile_module(mod, target, "cpu")         # the target's schedules and lowering

What differs per target (schedules for untuned kernels, lowering passes) comes from the target module
(`dyncompile.targets.<kind>`); the order of the steps lives here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from dyncompile.errors import ConfigError
from dyncompile.targets import get_target

__all__ = ["PREPARE_PASSES", "LAYOUTS", "TRANSFORM_SUFFIX", "prepare", "entry_module", "kernels", "is_scheduled",
           "apply_database", "compile_module"]

TRANSFORM_SUFFIX = "_transform_params"  # `<sub-net>_transform_params`: weight arithmetic run once at load


def _relax(pass_name: str) -> Callable[[Any, str], Any]:
    def make(_target: Any, _layout: str) -> Any:
        from tvm import relax

        return getattr(relax.transform, pass_name)()

    return make


def _blocked_layout(target: Any, layout: str) -> Any | None:
    if not layout.startswith("blocked") or target.kind.name != "llvm":
        return None
    from dyncompile.targets.blocked_layout import to_blocked_layout
    from dyncompile.targets.llvm_common import vector_lanes

    return to_blocked_layout(vector_lanes(target))


def _share_weights(target: Any, layout: str) -> Any:
    from dyncompile.targets.shared_weights import share_weights

    return share_weights(rewrite=layout == "blocked" and target.kind.name == "llvm")


def _legalize(_target: Any, _layout: str) -> Any:
    from tvm import relax

    from dyncompile.targets.blocked_layout import BLOCKED_LEGALIZE

    return relax.transform.LegalizeOps(BLOCKED_LEGALIZE)  # unblocked conv2d legalizes the default way


# `prepare(layout=)`: CPU convolutions in NCHW[b]c reading shared weights (the default), in NCHW[b]c with each
# sub-net's own blocked copy of its weights (what sharing costs or buys), or left in NCHW
LAYOUTS = ("blocked", "blocked-copies", "nchw")

# (name, factory(target, layout) → pass or None to skip), in order; names are what `dump_after` takes.
PREPARE_PASSES: list[tuple[str, Callable[[Any, str], Any]]] = [
    # Composite ops → arithmetic for inference (BN variants `for_inference` left, layer norm…), then drop
    # the trivial bindings that leaves.
    ("decompose", _relax("DecomposeOpsForInference")),
    ("canonicalize", _relax("CanonicalizeBindings")),
    # LLVM targets: convolutions in the blocked layout NCHW[b]c (see blocked_layout.py); before lifting, so the
    # weights' layout transforms run once at load.
    ("blocked-layout", _blocked_layout),
    ("normalize", _relax("Normalize")),
    # LLVM targets: blocked convs and dense layers read the full model's weight in place (shared_weights.py), so
    # all sub-nets share one copy; before lifting, so no per-sub-net copy is made.
    ("share-weights", _share_weights),  # (also drops the import's FULL_SHAPES attribute where it does not share)
    # Arithmetic on weights only (BN scale and shift, layout transforms) moves to `<name>_transform_params`.
    ("lift-params", _relax("LiftTransformParams")),
    # Legalize to TIR and fuse (the "zero" pipeline): MetaSchedule extracts 0 tasks before this.
    ("legalize", _legalize),
    ("annotate", _relax("AnnotateTIROpPattern")),
    ("fold-constants", _relax("FoldConstant")),
    ("fuse", _relax("FuseOps")),
    ("fuse-tir", _relax("FuseTIR")),
]


def prepare(mod: Any, target: Any, *, layout: str = "blocked", dump_after: str | None = None,
            log: list | None = None) -> Any:
    """Run `PREPARE_PASSES` under `target`; `layout`: one of `LAYOUTS` ("blocked-copies" and "nchw" are for
    measuring what shared weights and the blocked layout buy); `dump_after`: print the module after that pass
    (debugging); `log`: gets (pass, seconds) per pass."""
    import tvm

    names = [name for name, _ in PREPARE_PASSES]
    if dump_after is not None and dump_after not in names:
        raise ConfigError(f"unknown pass '{dump_after}'; passes: {', '.join(names)}")
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout '{layout}'; layouts: {', '.join(LAYOUTS)}")
    with target, tvm.transform.PassContext(opt_level=3):
        for name, make_pass in PREPARE_PASSES:
            start = time.perf_counter()
            step = make_pass(target, layout)
            if step is not None:
                mod = step(mod)
            if log is not None:
                log.append((name, time.perf_counter() - start))
            if name == dump_after:
                print(mod.script())
    return mod


def entry_module(mod: Any, entries: list[str]) -> Any:
    """`mod` reduced to the Relax functions `entries` and the kernels they call."""
    import tvm
    from tvm import relax

    # DeadCodeElimination keeps every function with a global symbol, so drop the other Relax functions first.
    kept = {g: f for g, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) or g.name_hint in entries}
    return relax.transform.DeadCodeElimination(entry_functions=entries)(tvm.IRModule(kept, attrs=mod.attrs))


def kernels(mod: Any) -> list[Any]:
    """The TIR kernels (PrimFuncs) of `mod`."""
    import tvm

    return [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


def is_scheduled(kernel: Any) -> bool:
    """Whether `kernel` carries a schedule (from the tuning database, or a target's default rules)."""
    return bool(kernel.attrs is not None and kernel.attrs.get("tirx.is_scheduled", False))


def apply_database(mod: Any, target: Any, tuning_dir: str | Path) -> Any:
    """Give every kernel that has a record in the tuning database at `tuning_dir` its tuned schedule."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    database = ms.database.JSONDatabase(work_dir=str(tuning_dir))
    with target, database, tvm.transform.PassContext(opt_level=3):
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)


def compile_module(mod: Any, target: Any, target_name: str) -> Any:
    """Give unscheduled kernels the target's schedules, lower to the VM and compile once. Right after the
    target's memory planning, every sub-net's activation blocks get shared sizes (`shared_activations.py`)."""
    import tvm

    from dyncompile.targets.shared_activations import share_activation_storage

    kind = get_target(target_name)
    passes = []
    for step in kind.schedule_passes(target) + kind.lower_passes(target):
        passes.append(step)
        if step.info.name == "StaticPlanBlockMemory":
            passes.append(share_activation_storage(skip=lambda name: name.endswith(TRANSFORM_SUFFIX)))
    pipeline = tvm.transform.Sequential(passes)
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target, relax_pipeline=pipeline)
