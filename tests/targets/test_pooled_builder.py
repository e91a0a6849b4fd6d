"""The tuning builder keeps its worker processes between batches (each new worker imports TVM, seconds) and
still builds for every target kind: a host library for cpu, an aarch64 library for arm (via f_export)."""

import os
import shutil

import pytest

from dyncompile.targets import get_target


def _matmul_input(target):
    import tvm
    from tvm import te
    from tvm.s_tir.meta_schedule.builder import BuilderInput

    a = te.placeholder((16, 16), name="a")
    b = te.placeholder((16, 16), name="b")
    k = te.reduce_axis((0, 16), name="k")
    c = te.compute((16, 16), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
    return BuilderInput(tvm.IRModule({"main": te.create_prim_func([a, b, c])}), target)


def _remove_artifacts(results) -> None:
    """Each artifact sits in its own temporary folder (MetaSchedule's RemoveBuildArtifact does this when tuning)."""
    for r in results:
        if r.artifact_path:
            shutil.rmtree(os.path.dirname(r.artifact_path), ignore_errors=True)


def _worker_pids(builder) -> set[int]:
    return {w._proc.pid for w in builder.pool._worker_map.values() if w._proc is not None}


def test_cpu_builder_reuses_its_workers_across_batches():
    kind = get_target("cpu")
    builder = kind.tuning_builder(60.0)
    results = []
    try:
        results += builder.build([_matmul_input(kind.tvm_target())] * 2)
        pids = _worker_pids(builder)
        results += builder.build([_matmul_input(kind.tvm_target())] * 2)
        assert [r.error_msg for r in results] == [None] * 4
        assert pids and _worker_pids(builder) == pids
    finally:
        builder.close()
        _remove_artifacts(results)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="needs gcc-aarch64-linux-gnu")
def test_arm_builder_exports_aarch64_libraries_with_the_cross_compiler():
    kind = get_target("arm")
    builder = kind.tuning_builder(60.0)
    try:
        (result,) = builder.build([_matmul_input(kind.tvm_target())])
    finally:
        builder.close()
    assert result.error_msg is None
    with open(result.artifact_path, "rb") as f:
        header = f.read(20)
    _remove_artifacts([result])
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
