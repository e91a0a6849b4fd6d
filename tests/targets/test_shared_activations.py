"""targets/shared_activations.py: every sub-net's k-th largest activation block gets one size, so the VM's pooled
allocator hands one sub-net the blocks another freed; the functions still compute what they computed."""

import numpy as np
import pytest

from dyncompile.targets.shared_activations import share_activation_storage, storage_sizes

tvm = pytest.importorskip("tvm")
relax = tvm.relax


def _subnet(bb, name: str, width: int, depth: int):
    """x (1, 16) → `depth` times (dense to `width`, relu) → dense to 4: `depth` intermediate tensors."""
    x = relax.Var("x", relax.TensorType((1, 16), "float32"))
    first = relax.Var("w0", relax.TensorType((16, width), "float32"))
    rest = relax.Var("w", relax.TensorType((width, width), "float32"))
    last = relax.Var("wl", relax.TensorType((width, 4), "float32"))
    with bb.function(name, [x, first, rest, last]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.matmul(x, first)))
            for _ in range(depth - 1):
                y = bb.emit(relax.op.nn.relu(relax.op.matmul(y, rest)))
            out = bb.emit_output(relax.op.matmul(y, last))
        bb.emit_func_output(out)


def _module():
    bb = relax.BlockBuilder()
    _subnet(bb, "wide", 64, 3)
    _subnet(bb, "narrow", 24, 4)
    _subnet(bb, "wide_transform_params", 256, 3)  # runs once at load: must keep its own blocks
    return bb.get()


def _planned(mod, share: bool):
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    target = tvm.target.Target("llvm")
    passes = cpu.legalize_passes(target) + cpu.dataflow_lower_passes(target) + [relax.transform.StaticPlanBlockMemory()]
    if share:
        passes.append(share_activation_storage(skip=lambda name: name.endswith("_transform_params")))
    with target:
        return tvm.transform.Sequential(passes)(mod)


def test_every_function_asks_for_the_same_block_sizes():
    before = storage_sizes(_planned(_module(), share=False))
    after = storage_sizes(_planned(_module(), share=True))
    assert before["wide"] != before["narrow"], before  # the premise: different widths plan different blocks
    assert after["wide"] == after["narrow"][: len(after["wide"])], after
    for k, size in enumerate(after["narrow"]):  # each k-th block: the largest k-th block of the two
        assert size == max(sizes[k] for sizes in (before["wide"], before["narrow"]) if k < len(sizes))
    assert after["wide_transform_params"] == before["wide_transform_params"]  # skipped: left alone
    assert after["wide"][0] < before["wide_transform_params"][0]  # ...and its large blocks grew nobody's


def test_functions_compute_the_same_after_sharing():
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    target = tvm.target.Target("llvm")
    results = []
    for share in (False, True):
        passes = cpu.legalize_passes(target) + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
        if share:
            passes.insert(passes.index(next(p for p in passes if p.info.name == "StaticPlanBlockMemory")) + 1,
                          share_activation_storage())
        with target:
            executable = tvm.compile(_module(), target, relax_pipeline=tvm.transform.Sequential(passes))
        vm = relax.VirtualMachine(executable, tvm.cpu())
        rng = np.random.default_rng(0)
        out = []
        for name, width in (("wide", 64), ("narrow", 24), ("wide", 64)):  # narrow reuses wide's blocks, and back
            shapes = ((1, 16), (16, width), (width, width), (width, 4))
            args = [rng.standard_normal(s).astype("float32") for s in shapes]
            out.append(vm[name](*[tvm.runtime.tensor(a) for a in args]).numpy())
        results.append(out)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
