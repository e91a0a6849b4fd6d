"""What the LLVM-based targets share: cpu, arm, and the host part of cuda.

    isa_features(target)      # the instruction-set features a build enables (what check_runnable compares)
    largest_divisor(n, at_most)   # the block and tile sizes of blocked layouts and default schedules
    vector_lanes(target)      # fp32 lanes of the widest vector unit the build may use (16 AVX-512, 8 AVX, 4 NEON)
    physical_cores()          # the cores this process may run on, hyper-threads counted once
    use_all_cores()           # TVM's thread pool sized to those cores (it otherwise takes half the CPUs on x86),
                              # its workers not pinned (a pinned worker shares its core with the caller at times)
    build_candidate           # MetaSchedule's build function, without its slow tensor-intrinsics import
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

__all__ = ["BIND_ENV", "ISA_FEATURE", "THREADS_ENV", "isa_features", "largest_divisor", "vector_lanes",
           "physical_cores", "use_all_cores", "build_candidate"]

THREADS_ENV = "TVM_NUM_THREADS"
BIND_ENV = "TVM_BIND_THREADS"  # "1" (TVM's default): each worker pinned to a core

# LLVM features that are instructions (not tuning hints such as "fast-lzcnt" or "slow-3ops-lea"): code built
# with one of these enabled cannot run on a CPU that lacks it.
ISA_FEATURE = re.compile(r"^(sse|ssse|avx|fma|f16c|bmi|amx|vpclmul|vaes|gfni|popcnt|lzcnt|movbe|adx|sha|aes|"
                         r"pclmul|neon|sve|fp-armv8|dotprod|fullfp16|i8mm|bf16|crypto|lse|rcpc)")


def isa_features(target: Any) -> list[str]:
    """The instruction-set features LLVM enables for `target` (an llvm `tvm.target.Target`), sorted."""
    import tvm

    return sorted(f for f in tvm.target.codegen.llvm_get_cpu_features(target) if ISA_FEATURE.match(f))


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of `n` that is at most `at_most` (a block or tile must divide the loop it splits)."""
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def vector_lanes(target: Any) -> int:
    """fp32 lanes of the widest vector registers `target` (llvm) enables: the channel block of its convolutions."""
    features = set(isa_features(target))
    if "avx512f" in features:
        return 16
    if "avx" in features or "avx2" in features:
        return 8
    return 4  # SSE, NEON


def physical_cores() -> int:
    """How many distinct physical cores this process may run on (its CPU affinity, SMT siblings counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology: count every CPU
    return max(1, len(cores))


def use_all_cores() -> int:
    """Size TVM's CPU thread pool to `physical_cores()` unless the user set `TVM_NUM_THREADS`, with its workers
    left to the OS scheduler unless the user set `TVM_BIND_THREADS`; returns the thread count.

    Without the count TVM assumes two hyper-threads per core on x86 and starts half as many workers as there are
    CPUs: on a 2-core machine without SMT, one thread (measured: ResNet-20 ran at half speed). Without unbinding,
    TVM pins worker k to core k but leaves the calling thread (worker 0) free; when the OS puts the caller on
    core 1, it shares that core with worker 1 and every call takes twice as long until it moves (measured: a
    VGG-style sub-net 0.225 ms, 0.456 ms with the caller on core 1, 0.225 ms either way unbound). That made
    whole benchmark rows twice as slow at random. The pool reads both variables when it is configured, so this
    must run before the first kernel; measurement workers inherit them.
    """
    os.environ.setdefault(THREADS_ENV, str(physical_cores()))
    os.environ.setdefault(BIND_ENV, "0")
    return int(os.environ[THREADS_ENV])


def build_candidate(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's default build without `import tvm.s_tir.tensor_intrin` (about 23 s in every worker)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)
