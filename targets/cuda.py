"""Target `cuda`: NVIDIA GPUs through TVM's CUDA code generator, with dlight GPU schedules.

Every fused kernel tuning did not cover gets a dlight rule (`tvm.s_tir.dlight.gpu`: Matmul, GEMV, Reduction,
GeneralReduction, Fallback, the rules TVM's own CUDA pipeline applies), so an untuned build is a usable GPU
program, not one thread per output. The device code is compiled for one architecture (`arch="sm_80"` by
default; `--arch` on the command line), by NVRTC when cuda-python is installed, otherwise by `nvcc` (TVM's
`TVM_CUDA_COMPILE_MODE=nvcc`). Code generation needs no GPU, so a deployable for a GPU server can be built on
a laptop; running it (and MetaSchedule tuning, which measures candidates) needs one:

    >>> from dyncompile.targets import cuda
    >>> target = cuda.tvm_target(arch="sm_86")
    >>> cuda.check_runnable(cuda.describe(target))   # None on a machine with a GPU that runs sm_86 code
    'no CUDA GPU is visible here (tvm.cuda().exist is False)'

Where TVM cannot load its CUDA runtime (no driver, `libcuda.so.1`, as on a build machine without a GPU), its
code generator keeps the kernels as CUDA C inside the library (`describe(...)["device_code"] == "source"`) and
the GPU machine's TVM compiles them when it loads the library (TVM's documented fallback path; NVRTC or nvcc
must be installed there, which `check_runnable` checks). With a driver present they are compiled at build time.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from typing import Any

from dyncompile.errors import ConfigError
from dyncompile.targets import cpu
from dyncompile.targets.llvm_common import isa_features
from dyncompile.targets.pooled_builder import pooled_builder

__all__ = ["name", "device", "description", "DEFAULT_ARCH", "tvm_target", "describe", "check_toolchain",
           "schedule_passes", "default_schedule", "runtime_setup", "lower_passes", "tensor_intrinsics",
           "tuning_builder", "tuning_runner", "export_library", "check_runnable", "device_sources"]

name = "cuda"
device = "cuda"
description = "NVIDIA GPU: TVM CUDA codegen with dlight schedules (--arch sm_XX, default sm_80)"

DEFAULT_ARCH = "sm_80"
_ARCH = re.compile(r"^sm_(\d)(\d+)[af]?$")


def tvm_target(*, arch: str = DEFAULT_ARCH) -> Any:
    """`cuda` for compute capability `arch` ("sm_80": A100, "sm_86": RTX 30xx, "sm_90": H100), host code for
    this machine's CPU."""
    import tvm

    if not _ARCH.match(arch or ""):
        raise ConfigError(f"--arch wants a CUDA architecture like sm_80 or sm_90, got '{arch}'")
    host = cpu.tvm_target(num_cores=1)
    return tvm.target.Target({"kind": "cuda", "arch": arch, "host": {
        "kind": "llvm", "mtriple": str(host.attrs["mtriple"]), "mcpu": str(host.attrs["mcpu"])}})


def _compute_capability(arch: str) -> tuple[int, int]:
    major, minor = _ARCH.match(arch).groups()
    return int(major), int(minor)


def describe(target: Any) -> dict:
    host = target.host
    return {
        "tvm_target": str(target),
        "arch": str(target.attrs["arch"]),
        "compute_capability": ".".join(map(str, _compute_capability(str(target.attrs["arch"])))),
        "host_mtriple": str(host.attrs["mtriple"]),
        "host_mcpu": str(host.attrs["mcpu"]),
        # the host part (the VM's glue) is LLVM code for this CPU: `check_runnable` compares like `cpu` does
        "isa_features": isa_features(host),
        "cuda_compiler": _compiler(),
        "device_code": "binary" if _runtime_loaded() else "source",
    }


def _runtime_loaded() -> bool:
    """Whether TVM's CUDA runtime is usable here (it needs the driver); without it kernels stay CUDA C."""
    import tvm

    return tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None


def _compiler() -> str | None:
    """"nvrtc" (cuda-python installed), "nvcc" (on PATH or in $CUDA_HOME), or None."""
    if importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None:
        return "nvrtc"
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if shutil.which("nvcc") or os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        return "nvcc"
    return None


def check_toolchain() -> None:
    """A CUDA C compiler must be installed (NVRTC via cuda-python, or nvcc); picks nvcc when NVRTC is missing.

    TVM compiles device code through NVRTC by default and fails without cuda-python; `TVM_CUDA_COMPILE_MODE`
    is TVM's own switch to nvcc (left alone when the user set it).
    """
    import tvm

    if str(tvm.support.libinfo().get("USE_CUDA", "OFF")).upper() in ("OFF", "0", ""):
        raise ConfigError("this TVM was built without CUDA; install an apache-tvm wheel built with USE_CUDA")
    compiler = _compiler()
    if compiler is None:
        raise ConfigError("no CUDA compiler found: install the CUDA toolkit's nvcc (e.g. pip install "
                          "nvidia-cuda-nvcc) or NVRTC (pip install cuda-python)")
    if compiler == "nvcc":
        os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")


def schedule_passes(target: Any) -> list:
    """dlight rules for every kernel without a schedule (tuned kernels carry one and are skipped)."""
    from tvm.s_tir import dlight as dl

    return [dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                    dl.gpu.Fallback())]


def default_schedule(kernel: Any, target: Any) -> Any | None:
    """None: tuning on GPUs starts from MetaSchedule's own candidates (dlight schedules are not entered)."""
    return None


def runtime_setup() -> None:
    """Nothing: kernels run on the GPU; the host side is the VM alone."""


def lower_passes(target: Any) -> list:
    from tvm.relax.backend.cuda import pipeline as cuda_pipeline

    return cuda_pipeline.dataflow_lower_passes(target) + cuda_pipeline.finalize_passes(target)


def tensor_intrinsics() -> list[str]:
    return ["cuda"]


def tuning_builder(timeout_s: float = 120.0) -> Any:
    check_toolchain()
    return pooled_builder(timeout_s)


def tuning_runner(rpc: str | None = None) -> Any:
    """MetaSchedule measures candidates on this machine's GPU (a remote GPU over RPC is not supported yet)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    if rpc:
        raise ConfigError("--rpc is for ARM boards; tune a cuda build on the machine that has the GPU")
    if not tvm.cuda().exist:
        raise ConfigError("tuning for cuda measures candidates on a GPU and none is visible here; build with "
                          "--tune-trials 0 (dlight schedules) or tune on the GPU machine")
    return ms.runner.LocalRunner(timeout_sec=60,
                                 evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50))


def export_library(executable: Any, path: str) -> None:
    executable.export_library(str(path))


def check_runnable(recorded: dict) -> str | None:
    import tvm

    host_why = cpu.check_runnable({"mtriple": recorded.get("host_mtriple", ""), "mcpu": recorded.get("host_mcpu"),
                                   "isa_features": recorded.get("isa_features", [])})
    if host_why:
        return host_why
    dev = tvm.cuda(0)
    if not dev.exist:
        return "no CUDA GPU is visible here (tvm.cuda().exist is False)"
    if recorded.get("device_code") == "source":
        compiler = _compiler()
        if compiler is None:
            return ("its kernels are CUDA C, compiled when the library loads, and no CUDA compiler is installed "
                    "here: pip install cuda-python (NVRTC), or install nvcc")
        if compiler == "nvcc":
            os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    built = tuple(int(v) for v in str(recorded.get("compute_capability", "0.0")).split("."))
    here = tuple(int(v) for v in dev.compute_version.split("."))
    # SASS for sm_XY runs on the same major version with minor ≥ Y only
    if built[0] != here[0] or built[1] > here[1]:
        return (f"it was built for compute capability {recorded.get('compute_capability')} and this GPU has "
                f"{dev.compute_version}; rebuild with --arch sm_{here[0]}{here[1]}")
    return None


def device_sources(executable_or_module: Any) -> dict[str, str]:
    """The device code of a compiled executable (or a loaded library): {"cu": CUDA C, format: …}.

    For inspection and tests: which kernels a build produced, without a GPU.
    """
    mod = getattr(executable_or_module, "mod", executable_or_module)
    found: dict[str, str] = {}
    for sub in mod.imports:
        for imp in [sub, *sub.imports]:
            if imp.kind == "cuda":
                # "" is the module's own format: CUDA C where no CUDA runtime compiled it (no libcuda here)
                for fmt in ("", "cu", "ptx", "fatbin", "cubin"):
                    try:
                        text = imp.inspect_source(fmt)
                    except Exception:  # noqa: BLE001 -- a format the module does not keep
                        continue
                    if text:
                        found.setdefault(fmt or ("cu" if "__global__" in text else "binary"), text)
    return found
