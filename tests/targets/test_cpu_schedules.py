"""The CPU build's speed path: blocked layout NCHW[b]c, default schedules for every kernel, TVM's thread count.

Correctness is checked on a network of odd shapes (channel counts 1, 3, 6, 12, 20 that give 1-, 3-, 6-, 12- and
10-wide blocks, stride 2, 1×1 and 5×5 windows, dilation, depthwise and grouped convs, a residual add) against
PyTorch, in both layouts.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from dyncompile.build import build
from dyncompile.deployable import write_deployable
from dyncompile.errors import ConfigError
from dyncompile.ir import uniform_config
from dyncompile.passes.extract import extract_subnet
from dyncompile.pipeline import analyse_model
from dyncompile import runtime
from dyncompile.targets import get_target
from dyncompile.targets.blocked_layout import channel_block
from dyncompile.targets.llvm_common import THREADS_ENV, physical_cores, vector_lanes
from dyncompile.targets.llvm_schedules import register_rows
from dyncompile.targets.pipeline import is_scheduled, kernels, prepare
from dyncompile.targets.relax_import import import_subnet


class OddShapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.down = nn.Conv2d(12, 20, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(20, 20, 3, padding=2, dilation=2)
        self.depthwise = nn.Sequential(nn.Conv2d(20, 20, 5, padding=2, groups=20), nn.BatchNorm2d(20), nn.ReLU6())
        self.grouped = nn.Conv2d(20, 6, 1, groups=2)
        self.pointwise = nn.Conv2d(6, 3, 1)
        self.head = nn.Linear(3, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.down(x)
        x = torch.relu(self.dilated(x) + x)
        x = self.pointwise(self.grouped(self.depthwise(x)))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def odd():
    torch.manual_seed(0)
    model = OddShapes().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return analyse_model(model, (2, 1, 14, 14), groups=4)


def test_channel_block_is_the_largest_divisor_that_fits_the_lanes():
    assert [channel_block(c, 16) for c in (1, 3, 12, 16, 20, 24, 48, 64, 7)] == [1, 3, 12, 16, 10, 12, 16, 16, 7]
    assert [channel_block(c, 4) for c in (1, 6, 8, 12)] == [1, 3, 4, 4]
    assert register_rows(28, 16) == 14 and register_rows(7, 16) == 7 and register_rows(32, 8) == 4


def test_vector_lanes_follow_the_target_isa():
    import tvm

    assert vector_lanes(get_target("arm").tvm_target()) == 4
    x86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
    assert vector_lanes(tvm.target.Target({**x86, "mcpu": "skylake-avx512"})) == 16
    assert vector_lanes(tvm.target.Target({**x86, "mcpu": "haswell"})) == 8


@pytest.mark.parametrize("layout", ["blocked", "nchw"])
def test_odd_shapes_match_pytorch_at_every_width_in_both_layouts(odd, layout, tmp_path):
    subnets = {f"w{round(w * 100)}": uniform_config(odd, w) for w in (1.0, 0.5, 0.25)}
    out = write_deployable(tmp_path / layout, build(odd, subnets, target="cpu", batch_size=2, layout=layout), odd)
    model = runtime.load(out)
    x = torch.randn(2, 1, 14, 14)
    for name, config in subnets.items():
        with torch.no_grad():
            expected = extract_subnet(odd, config).eval()(x)
        assert torch.allclose(model.run(x, subnet=name), expected, atol=1e-4, rtol=0), (layout, name)


def test_blocked_layout_lowers_every_conv_to_a_blocked_kernel_and_every_kernel_gets_a_schedule(odd):
    import tvm

    kind = get_target("cpu")
    target = kind.tvm_target()
    func, _ = import_subnet(odd, "w100", uniform_config(odd, 1.0))
    mod = prepare(tvm.IRModule({"w100": func}), target)
    names = [g.name_hint for g, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    # five ungrouped convs (the 1×1 after the grouped one included) and the depthwise one are blocked; the
    # grouped conv (2 groups) stays in NCHW with layout transforms around it
    assert sum(n.startswith("fused_conv2d_NCHWc") or n.startswith("conv2d_NCHWc") for n in names) >= 4
    assert any("depthwise_conv2d_NCHWc" in n for n in names)
    with target:
        scheduled = tvm.transform.Sequential(kind.schedule_passes(target))(mod)
    assert all(is_scheduled(k) for k in kernels(scheduled))
    plain = prepare(tvm.IRModule({"w100": func}), target, layout="nchw")
    assert not any("NCHWc" in g.name_hint for g, _ in plain.functions_items())
    with pytest.raises(ConfigError, match="unknown layout 'nhwc'; layouts: blocked, blocked-copies, nchw"):
        prepare(tvm.IRModule({"w100": func}), target, layout="nhwc")


def test_tvm_threads_default_to_the_physical_cores_and_the_users_setting_wins():
    code = ("import os; from dyncompile.targets.llvm_common import use_all_cores; "
            f"n = use_all_cores(); print(n, os.environ['{THREADS_ENV}'])")
    env = {k: v for k, v in os.environ.items() if k != THREADS_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(physical_cores())] * 2
    env[THREADS_ENV] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1"]
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


def test_loading_a_deployable_sizes_tvms_thread_pool_to_the_cores(odd, tmp_path):
    out = write_deployable(tmp_path / "d", build(odd, {"w50": uniform_config(odd, 0.5)}, batch_size=2), odd)
    code = (f"from dyncompile import runtime; import tvm, numpy as np; m = runtime.load({str(out)!r}); "
            "m.run(np.zeros((2, 1, 14, 14), np.float32), subnet='w50'); "
            "print(tvm.get_global_func('runtime.NumThreads')())")
    env = {k: v for k, v in os.environ.items() if k != THREADS_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert int(out.split()[-1]) == physical_cores()


class UnevenConcat(nn.Module):
    """Concatenates 12- and 6-channel maps: 18 channels in no block of the first input's 12 (TVM's ConvertLayout
    fails with "Invalid layout axis 12b")."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.c = nn.Conv2d(18, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


def test_a_subnet_the_layout_cannot_be_carried_through_keeps_nchw_with_a_warning(caplog, tmp_path):
    torch.manual_seed(0)
    dg = analyse_model(UnevenConcat().eval(), (1, 3, 8, 8), groups=2)
    subnets = {"w100": uniform_config(dg, 1.0)}
    with caplog.at_level("WARNING", logger="dyncompile"):
        model = runtime.load(write_deployable(tmp_path / "d", build(dg, subnets), dg))
    assert "sub-net w100 keeps its convolutions in NCHW (slower)" in caplog.text
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = extract_subnet(dg, subnets["w100"]).eval()(x)
    assert torch.allclose(model.run(x, subnet="w100"), expected, atol=1e-4, rtol=0)
