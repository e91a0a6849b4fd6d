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
from typing import Any

from dyncompile.errors import ConfigError
from dyncompile.targets import get_target

__all__ = ["PREPARE_PASSES", "TRANSFORM_SUFFIX", "prepare", "entry_module", "kernels", "is_scheduled",
           "apply_database", "compile_module"]

TRANSFORM_SUFFIX = "_transform_params"  # `<sub-net>_transform_params`: weight arithmetic run once at load

# (name, tvm.relax.transform pass), in order; names are what `dump_after` takes.
PREPARE_PASSES: list[tuple[str, str]] = [
    # Composite ops → arithmetic for inference (BN variants `for_inference` left, layer norm…), then drop
    # the trivial bindings that leaves.
    ("decompose", "DecomposeOpsForInference"),
    ("canonicalize", "CanonicalizeBindings"),
    # Arithmetic on weights only (BN scale and shift) moves to `<name>_transform_params`, run once at load.
    ("lift-params", "LiftTransformParams"),
    # Legalize to TIR and fuse (the "zero" pipeline): MetaSchedule extracts 0 tasks before this.
    ("legalize", "LegalizeOps"),
    ("annotate", "AnnotateTIROpPattern"),
    ("fold-constants", "FoldConstant"),
    ("fuse", "FuseOps"),
    ("fuse-tir", "FuseTIR"),
]


def prepare(mod: Any, target: Any, *, dump_after: str | None = None, log: list | None = None) -> Any:
    """Run `PREPARE_PASSES` under `target`; `dump_after`: print the module after that pass (debugging);
    `log`: gets (pass, seconds) per pass."""
    import tvm
    from tvm import relax

    names = [name for name, _ in PREPARE_PASSES]
    if dump_after is not None and dump_after not in names:
        raise ConfigError(f"unknown pass '{dump_after}'; passes: {', '.join(names)}")
    with target, tvm.transform.PassContext(opt_level=3):
        for name, pass_name in PREPARE_PASSES:
            start = time.perf_counter()
            mod = getattr(relax.transform, pass_name)()(mod)
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
    """Give unscheduled kernels the target's schedules, lower to the VM and compile once."""
    import tvm

    kind = get_target(target_name)
    pipeline = tvm.transform.Sequential(kind.schedule_passes(target) + kind.lower_passes(target))
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target, relax_pipeline=pipeline)
