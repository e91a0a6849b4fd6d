"""MetaSchedule's local builder, with its worker processes kept from one batch of candidates to the next.

TVM's LocalBuilder starts a fresh process pool for every batch (against a memory leak in long-lived workers),
and each new worker imports TVM: 3.5-5 s on this 2-core machine, paid again for every kernel. With 8 trials per
kernel that import was most of the build time per kernel. Here the pool lives as long as the builder and each
worker is replaced after `USES_PER_WORKER` builds, which keeps the leak bounded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

USES_PER_WORKER = 32


def pooled_builder(timeout_s: float, *, f_build: Callable | None = None, f_export: Callable | None = None) -> Any:
    """A MetaSchedule builder like `LocalBuilder(timeout_sec=timeout_s, f_build=…, f_export=…)` whose workers
    persist; call its `close()` when tuning is done."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class PooledBuilder(PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.pool = PopenPoolExecutor(max_workers=max(1, os.cpu_count() or 1), timeout=timeout_s,
                                          maximum_process_uses=USES_PER_WORKER)

        def build(self, build_inputs: list) -> list:
            jobs = [(f_build, f_export, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
            results = []
            for done in self.pool.map_with_error_catching(lambda job: _worker_func(*job), jobs):
                if done.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(done.value, None))
                elif done.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"builder: timed out, killed after {timeout_s} s"))
                else:
                    results.append(BuilderResult(None, f"builder: an exception occurred\n{done.value}"))
            return results

        def close(self) -> None:
            self.pool.shutdown(wait=True)

    return PooledBuilder()
