"""What the LLVM-based targets share: cpu, arm, and the host part of cuda.

    isa_features(target)      # the instruction-set features a build enables (what check_runnable compares)
    build_candidate           # MetaSchedule's build function, without its slow tensor-intrinsics import
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["ISA_FEATURE", "isa_features", "build_candidate"]

# LLVM features that are instructions (not tuning hints such as "fast-lzcnt" or "slow-3ops-lea"): code built
# with one of these enabled cannot run on a CPU that lacks it.
ISA_FEATURE = re.compile(r"^(sse|ssse|avx|fma|f16c|bmi|amx|vpclmul|vaes|gfni|popcnt|lzcnt|movbe|adx|sha|aes|"
                         r"pclmul|neon|sve|fp-armv8|dotprod|fullfp16|i8mm|bf16|crypto|lse|rcpc)")


def isa_features(target: Any) -> list[str]:
    """The instruction-set features LLVM enables for `target` (an llvm `tvm.target.Target`), sorted."""
    import tvm

    return sorted(f for f in tvm.target.codegen.llvm_get_cpu_features(target) if ISA_FEATURE.match(f))


def build_candidate(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's default build without `import tvm.s_tir.tensor_intrin` (about 23 s in every worker)."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)
