"""Target `cpu`: LLVM for the host this runs on (detected mcpu, all its cores).

Code is compiled for the host's CPU model (`-mcpu`), so a deployable built here may use instructions (AVX-512,
…) another x86 machine lacks: `check_runnable` compares the instruction-set features the build enabled with
the machine loading it and refuses with a clear line instead of crashing on an illegal instruction.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from dyncompile.errors import ConfigError
from dyncompile.targets.llvm_common import build_candidate, isa_features, physical_cores, use_all_cores
from dyncompile.targets.pooled_builder import pooled_builder

__all__ = ["name", "device", "description", "tvm_target", "describe", "check_toolchain", "schedule_passes",
           "default_schedule", "runtime_setup", "lower_passes", "tensor_intrinsics", "tuning_builder",
           "tuning_runner", "export_library", "check_runnable"]

name = "cpu"
device = "cpu"
description = "LLVM for this machine's CPU (detected mcpu, all cores)"

def _host_triple() -> str:
    import tvm

    arch = tvm.target.codegen.llvm_get_system_triple().split("-")[0] or platform.machine()
    system = {"linux": "linux-gnu", "darwin": "apple-darwin"}.get(sys.platform, "unknown-unknown")
    return f"{arch}-{system}"


def tvm_target(*, mcpu: str | None = None, num_cores: int | None = None) -> Any:
    """`llvm` for the host: mcpu detected by LLVM unless given ("native" is rejected by TVM), all cores."""
    import tvm

    mcpu = mcpu or tvm.target.codegen.llvm_get_system_cpu()
    if not tvm.target.codegen.llvm_is_valid_cpu(mcpu, _host_triple()):
        raise ConfigError(f"LLVM does not know the CPU '{mcpu}'; leave --mcpu out to use this machine's CPU")
    cores = num_cores or physical_cores()
    return tvm.target.Target({"kind": "llvm", "mtriple": _host_triple(), "mcpu": mcpu, "num-cores": int(cores)})


def describe(target: Any) -> dict:
    return {
        "tvm_target": str(target),
        "mtriple": str(target.attrs["mtriple"]),
        "mcpu": str(target.attrs["mcpu"]),
        "num_cores": int(target.attrs["num-cores"]),
        "isa_features": isa_features(target),
    }


def check_toolchain() -> None:
    """Exporting a library links it with the host C compiler (`cc`, or $CXX/$CC)."""
    import shutil

    compilers = [os.environ.get("CXX"), os.environ.get("CC"), "g++", "gcc", "cc", "clang"]
    if not any(c and shutil.which(c) for c in compilers):
        raise ConfigError("no C compiler found to link the compiled library; install one (apt-get install g++)")


def schedule_passes(target: Any) -> list:
    """The default CPU schedules (`llvm_schedules`) for every kernel tuning did not cover."""
    from dyncompile.targets.llvm_schedules import default_schedules

    return [default_schedules(target)]


def default_schedule(kernel: Any, target: Any) -> Any | None:
    """`kernel`'s default schedule as a traced Schedule (what tuning measures first), or None."""
    from dyncompile.targets import llvm_schedules

    return llvm_schedules.default_schedule(kernel, target)


def runtime_setup() -> None:
    """Before the first kernel runs in this process (load, tuning measurements): TVM's threads = the cores."""
    use_all_cores()


def lower_passes(target: Any) -> list:
    from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

    return cpu_pipeline.dataflow_lower_passes(target) + cpu_pipeline.finalize_passes(target)


def tensor_intrinsics() -> list[str]:
    """Modules of `tvm.s_tir.tensor_intrin` tuning for this CPU needs (the package imports every vendor's)."""
    return ["arm_cpu"] if _host_triple().startswith(("aarch64", "arm64")) else ["x86"]


def tuning_builder(timeout_s: float = 120.0) -> Any:
    # A worker's first build imports TVM: the stock 30 s timeout failed every candidate as "Build errors" on a
    # busy 2-core machine.
    return pooled_builder(timeout_s, f_build=build_candidate)


def tuning_runner(rpc: str | None = None) -> Any:
    from tvm.s_tir import meta_schedule as ms

    if rpc:
        raise ConfigError("--rpc is for ARM boards (--target arm); target cpu tunes and runs on this machine")

    return ms.runner.LocalRunner(timeout_sec=60,
                                 evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50))


def export_library(executable: Any, path: str) -> None:
    executable.export_library(path)


def check_runnable(recorded: dict) -> str | None:
    try:
        import tvm

        here = tvm_target(num_cores=1)
        host_arch, built_arch = _host_triple().split("-")[0], recorded["mtriple"].split("-")[0]
        if host_arch != built_arch:
            return f"it was built for {built_arch} and this machine is {host_arch}"
        missing = sorted(set(recorded.get("isa_features", [])) - set(isa_features(here)))
    except (ImportError, AttributeError):  # a runtime-only TVM cannot ask LLVM: trust the build
        return None
    if missing:
        return (f"it was built for CPU '{recorded['mcpu']}' and uses instructions this CPU "
                f"('{tvm.target.codegen.llvm_get_system_cpu()}') lacks: {', '.join(missing[:4])}")
    return None
