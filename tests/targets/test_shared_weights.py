"""targets/shared_weights.py: which weights a sub-net reads in place from the full stored tensor, and that the
kernels reading them compute what the per-sub-net copies computed."""

import numpy as np
import pytest

from dyncompile.deployable import ParamSlice, StoredLayout
from dyncompile.targets.blocked_layout import BLOCKED_LEGALIZE
from dyncompile.targets.cpu import tvm_target
from dyncompile.targets.shared_weights import CONV_STORE_AXES, FULL_SHAPES, share_weights, shared_layouts

tvm = pytest.importorskip("tvm")
relax = tvm.relax

FULL = (32, 32, 3, 3)  # the full model's conv weight (O, I, KH, KW); the sub-net keeps 16 of each


def _function(extra_use: bool):
    """A sub-net function: one blocked conv (16 → 16 channels, 3×3) whose weight is the prefix of FULL."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 1, 8, 8, 16), "float32"))
    w = relax.Var("p_w", relax.TensorType((16, 16, 3, 3), "float32"))
    with bb.function("sub", [x, w], attrs={"num_input": 1, FULL_SHAPES: {"p_w": list(FULL)}}):
        with bb.dataflow():
            blocked = bb.emit(relax.op.layout_transform(
                w, index_map=lambda o, i, h, v: (o // 16, i // 16, h, v, i % 16, o % 16)))
            y = bb.emit(relax.op.nn.conv2d(x, blocked, padding=1, data_layout="NCHW16c",
                                           kernel_layout="OIHW16i16o", out_layout="NCHW16c", out_dtype="float32"))
            if extra_use:  # the raw weight read by something that is not a conv
                y = bb.emit(relax.op.add(y, relax.op.sum(w)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, *args):
    target = tvm_target()
    with target:
        mod = relax.transform.LegalizeOps(BLOCKED_LEGALIZE)(mod)  # a blocked conv2d: onto topi's NCHWc
        executable = tvm.compile(mod, target)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["sub"](*(tvm.runtime.tensor(a) for a in args)).numpy()


def test_a_weight_read_only_by_blocked_convs_becomes_the_full_stored_tensor_and_computes_the_same():
    original = _function(extra_use=False)
    shared = share_weights()(original)
    func = shared["sub"]
    layout = StoredLayout(CONV_STORE_AXES, 16)  # every sub-net (here: one) reads it in 16-channel output blocks
    assert shared_layouts(func) == {"p_w": layout}
    assert tuple(int(d) for d in func.params[1].ty.shape) == (2, 32, 3, 3, 16)  # (O/16, I, KH, KW, 16) of FULL
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, 8, 8, 16)).astype("float32")
    full = rng.standard_normal(FULL).astype("float32")
    store = ParamSlice("p_w", "w", (None,) * 4, (2, 32, 3, 3, 16), "float32", layout).cut(full)
    assert np.array_equal(layout.unstore(store), full)
    copy = ParamSlice("p_w", "w", (tuple(range(16)), tuple(range(16)), None, None), (16, 16, 3, 3), "float32")
    expected = _run(original, x, copy.cut(full))
    np.testing.assert_allclose(_run(shared, x, store), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [None, 16])
def test_stored_layouts_round_trip(block):
    full = np.random.default_rng(1).standard_normal((32, 8, 3, 3)).astype("float32")
    layout = StoredLayout(CONV_STORE_AXES, block)
    stored = layout.store(full)
    assert stored.shape == layout.shape(full.shape) and np.array_equal(layout.unstore(stored), full)
    # a sub-net's 16 output channels and 4 input channels are a corner of the stored tensor
    corner = stored[0, :4] if block else stored[:4, :, :, :16]
    assert np.array_equal(corner, StoredLayout(CONV_STORE_AXES, block).store(full[:16, :4])[0] if block
                          else full[:16, :4].transpose(CONV_STORE_AXES))


def test_a_weight_anything_else_reads_keeps_its_own_copy():
    shared = share_weights()(_function(extra_use=True))
    func = shared["sub"]
    assert shared_layouts(func) == {}
    assert tuple(int(d) for d in func.params[1].ty.shape) == (16, 16, 3, 3)
    assert FULL_SHAPES not in (func.attrs or {})


def test_share_weights_off_only_drops_the_import_attribute():
    func = share_weights(rewrite=False)(_function(extra_use=False))["sub"]
    assert shared_layouts(func) == {} and FULL_SHAPES not in (func.attrs or {})
    assert tuple(int(d) for d in func.params[1].ty.shape) == (16, 16, 3, 3)


@pytest.mark.parametrize("index, prefix", [((None, (0, 1, 2)), True), (((0, 1), None), True),
                                           (((0, 2),), False), (((1, 2),), False)])
def test_only_prefix_cuts_can_be_read_in_place(index, prefix):
    assert ParamSlice("p", "w", index, (1,), "float32").is_prefix() is prefix
