"""Compilation targets, one module per kind, found through one registry keyed by name.

    get_target("cpu")  ──▶  dyncompile.targets.cpu   (a module with the `TargetKind` interface)

`dyncompile.build` and `dyncompile.runtime` never ask "which target is this?": they look the kind up here
and call its functions. A new target is one new module plus one line in `TARGETS`. Targets that run on a
separate board (arm) also provide `check_board(rpc)` and `remote_vm(...)` (a context giving an object with
`run`, `time` and `upload`, see `arm.RemoteVM`), which `--rpc` uses. Target
modules import TVM only inside their functions, so listing or looking up targets stays fast.

Beside the target modules, the compile steps every target goes through:

    channel_order.py  the order the full weights are stored in, so every sub-net's cut of them is a prefix
    relax_import.py   one sub-net → a Relax function + the recipe that cuts its weights from the full ones
    pipeline.py       the prepare pass list, applying tuning records, the target's schedules and lowering
    tuning.py         MetaSchedule tuning, one database and ledger per target, resumable
    blocked_layout.py CPU convolutions in the blocked layout NCHW[b]c (ConvertLayout + legalizing onto topi)
    llvm_schedules.py the default schedules of CPU kernels no tuning record covers (cpu and arm)
    llvm_common.py    what the LLVM targets share (ISA features, vector lanes, cores/threads, candidate builder)
    pooled_builder.py the MetaSchedule builder with long-lived workers
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from dyncompile.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import tvm

__all__ = ["TARGETS", "TargetKind", "UnknownTargetError", "get_target", "known_targets", "check_board_for"]

# name -> module implementing `TargetKind`
TARGETS: dict[str, str] = {
    "arm": "dyncompile.targets.arm",
    "cpu": "dyncompile.targets.cpu",
    "cuda": "dyncompile.targets.cuda",
}


class UnknownTargetError(ConfigError):
    """No target of that name is registered."""


class TargetKind(Protocol):
    """What every target module provides (module-level names and functions).

    name: the registry key, recorded in the deployable's manifest.
    device: the runtime device kind its code runs on ("cpu", "cuda"); `runtime.load(device=...)` must match.
    """

    name: str
    device: str
    description: str

    def tvm_target(self, **options: Any) -> tvm.target.Target:
        """The TVM target to compile for; `options` are target specific (cpu: mcpu, num_cores)."""

    def describe(self, target: tvm.target.Target) -> dict:
        """JSON facts about `target` for the manifest (what `check_runnable` later compares)."""

    def check_toolchain(self) -> None:
        """Raise ConfigError (one line, with the fix) if a compiler or library this target needs is missing."""

    def schedule_passes(self, target: tvm.target.Target) -> list:
        """Passes that give kernels tuning did not cover a schedule (`llvm_schedules` on CPUs; dlight on GPUs)."""

    def default_schedule(self, kernel: Any, target: tvm.target.Target) -> Any | None:
        """The schedule an untuned `kernel` gets, as a traced `tvm.s_tir.Schedule`, or None (tuning measures it
        first and keeps it in the database, so a tuned kernel replaces it only where it measured faster)."""

    def runtime_setup(self) -> None:
        """Process settings the runtime reads when it starts (cpu: TVM's thread count); called before loading a
        deployable here and before tuning measures candidates."""

    def lower_passes(self, target: tvm.target.Target) -> list:
        """Relax passes from fused, scheduled Relax down to what the VM code generator takes."""

    def tensor_intrinsics(self) -> list[str]:
        """Modules of `tvm.s_tir.tensor_intrin` that tuning for this target needs (e.g. ["x86"])."""

    def tuning_builder(self, timeout_s: float) -> Any:
        """The MetaSchedule builder for tuning candidates."""

    def tuning_runner(self, rpc: str | None = None) -> Any:
        """The MetaSchedule runner that measures candidates: locally, or on the board at `rpc` ("HOST:PORT";
        ConfigError for a target that does not run on boards)."""

    def export_library(self, executable: Any, path: str) -> None:
        """Write the compiled executable as a shared library at `path` (cross-linked where needed)."""

    def check_runnable(self, recorded: dict) -> str | None:
        """None if code built for `recorded` (a `describe` result) runs on this machine, else why not."""


def known_targets() -> list[str]:
    return sorted(TARGETS)


def get_target(name: str) -> TargetKind | ModuleType:
    """The target module registered as `name`; UnknownTargetError (listing the known ones) otherwise."""
    if name not in TARGETS:
        raise UnknownTargetError(f"unknown target '{name}'; known targets: {', '.join(known_targets())}")
    return importlib.import_module(TARGETS[name])


def check_board_for(kind: TargetKind | ModuleType, rpc: str) -> None:
    """ConfigError unless target `kind` runs on boards (it has `remote_vm`), then check that the board at
    `rpc` ("HOST:PORT") answers (the target's `check_board`: ConfigError or BoardError, one line)."""
    if not hasattr(kind, "remote_vm"):
        raise ConfigError(f"--rpc is for boards (--target arm); target '{kind.name}' runs on this machine")
    kind.check_board(rpc)
