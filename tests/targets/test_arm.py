"""Target `arm`: a small PyTorch net compiled for aarch64 and cross-linked; toolchain and board errors; and
(marker `arm`) the same library run on the emulated Cortex-A72 board over RPC, compared with PyTorch.

The `arm` tests start their own board with scripts/emulated-arm-board (the first set-up on a machine downloads
~120 MB and takes about a minute; later starts take seconds) and stop it afterwards. Deselect them with
`-m "not arm"`.
"""

import os
import socket
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dyncompile.errors import ConfigError, DyncompileError
from dyncompile.targets import TargetKind
from dyncompile.targets import arm

REPO = Path(__file__).resolve().parents[2]
BOARD_SCRIPT = REPO / "scripts" / "emulated-arm-board"
EM_AARCH64 = 183  # ELF e_machine of AArch64


class TinyNet(nn.Module):
    """Conv-BN-ReLU, strided conv, pooling, linear; returns a tuple so the board's tuple outputs are read too."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        f = self.features(x)
        return self.head(f), f


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, example input, weights in the Relax function's order, path of the aarch64 library)."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():  # non-trivial BN statistics: defaults (0, 1) would hide a wrong fold
        bn = model.features[1]
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 16, 16)
    mod = from_exported_program(torch.export.export(model, (x,)), keep_params_as_input=True)
    mod, params = detach_params(mod)
    target = arm.tvm_target()
    pipeline = tvm.transform.Sequential(cpu_generic.library_dispatch_passes(target)
                                        + cpu_generic.legalize_passes(target)
                                        + arm.schedule_passes(target) + arm.lower_passes(target))
    executable = tvm.compile(mod, target, relax_pipeline=pipeline)
    lib = tmp_path_factory.mktemp("arm") / "tiny.so"
    arm.export_library(executable, str(lib))
    return model, x, [p.numpy() for p in params["main"]], lib


@pytest.fixture(scope="module")
def tuple_lib(tmp_path_factory):
    """A library whose function takes a tuple and returns one element unchanged, like `<subnet>_transform_params`."""
    import tvm
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class PassThrough:
        @R.function
        def pick(params: R.Tuple(R.Tensor((3,), "float32"), R.Tensor((2, 2), "float32"))):
            a = params[0]
            b = params[1]
            doubled = R.add(b, b)
            return (a, doubled)

    lib = tmp_path_factory.mktemp("arm") / "pass_through.so"
    arm.export_library(tvm.compile(PassThrough, arm.tvm_target()), str(lib))
    return lib


@pytest.fixture(scope="module")
def sve_lib(tmp_path_factory):
    """An element-wise kernel compiled for an SVE CPU (A64FX): instructions a Cortex-A72 does not have."""
    import tvm
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class AddMul:
        @R.function
        def main(x: R.Tensor((1024,), "float32"), y: R.Tensor((1024,), "float32")):
            z = R.multiply(R.add(x, y), y)
            return z

    lib = tmp_path_factory.mktemp("arm") / "sve.so"
    arm.export_library(tvm.compile(AddMul, arm.tvm_target(mcpu="a64fx", mattr=["+sve"])), str(lib))
    return lib


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ── target and build (default suite) ──

def test_target_is_llvm_for_aarch64_with_neon_and_only_the_named_cpu_s_features():
    t = arm.tvm_target()
    assert t.kind.name == "llvm"
    assert str(t.attrs["mtriple"]) == "aarch64-linux-gnu"
    assert str(t.attrs["mcpu"]) == "cortex-a72"
    assert "+neon" in [str(f) for f in t.attrs["mattr"]]
    # qemu's default CPU has SVE; the board emulates a Cortex-A72, so the code must not use it
    assert not t.attrs["feature.has_sve"] and not t.attrs["feature.has_dotprod"]
    a76 = arm.tvm_target(mcpu="cortex-a76", num_cores=2, mattr=["+neon"])
    assert a76.attrs["feature.has_dotprod"] and int(a76.attrs["num-cores"]) == 2
    assert [str(f) for f in a76.attrs["mattr"]] == ["+neon"]
    facts = arm.describe(t)
    assert facts["mtriple"] == "aarch64-linux-gnu" and facts["mcpu"] == "cortex-a72"
    assert "neon" in facts["isa_features"] and "sve" not in facts["isa_features"]


@pytest.mark.parametrize("kwargs, message", [
    ({"mcpu": "cortex-a999"}, "LLVM does not know the ARM CPU 'cortex-a999'"),
    ({"mattr": ["dotprod"]}, "must look like \\+feature"),
    ({"num_cores": 0}, "num_cores must be at least 1"),
])
def test_bad_target_options_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        arm.tvm_target(**kwargs)


def test_module_provides_every_function_of_the_target_interface():
    for attr in ("name", "device", "description"):
        assert isinstance(getattr(arm, attr), str)
    methods = [m for m in vars(TargetKind) if not m.startswith("_") and callable(vars(TargetKind)[m])]
    assert methods, "TargetKind lists no functions?"
    for m in methods:
        assert callable(getattr(arm, m, None)), f"targets/arm.py lacks {m}()"
    assert arm.name == "arm" and arm.device == "cpu"


def test_tiny_torch_net_builds_into_an_aarch64_shared_library(tiny):
    lib = tiny[3]
    header = lib.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert header[4] == 2 and header[5] == 1  # 64-bit, little-endian
    assert int.from_bytes(header[16:18], "little") == 3  # ET_DYN: a shared object
    assert int.from_bytes(header[18:20], "little") == EM_AARCH64


@pytest.mark.skipif(os.uname().machine == "aarch64", reason="on an aarch64 machine the library is runnable")
def test_library_is_refused_on_this_machine_with_the_way_to_run_it():
    why = arm.check_runnable(arm.describe(arm.tvm_target()))
    assert why and "aarch64" in why and "--rpc HOST:PORT" in why and "scripts/emulated-arm-board start" in why


def test_missing_cross_compiler_is_one_line_naming_the_apt_package(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to find
    with pytest.raises(ConfigError) as err:
        arm.check_toolchain()
    assert "\n" not in str(err.value)
    assert "'aarch64-linux-gnu-gcc' is missing" in str(err.value)
    assert "apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross" in str(err.value)
    # exporting goes through the same check instead of failing inside TVM
    import tvm
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_exported_program

    net = nn.Linear(4, 2).eval()
    mod, _ = detach_params(from_exported_program(torch.export.export(net, (torch.randn(1, 4),)),
                                                 keep_params_as_input=True))
    with pytest.raises(ConfigError, match="gcc-aarch64-linux-gnu"):
        arm.export_library(tvm.compile(mod, arm.tvm_target()), str(tmp_path / "x.so"))


def test_cross_compiler_without_the_arm_c_library_names_libc6_dev_arm64_cross(monkeypatch, tmp_path):
    fake = tmp_path / "fake-aarch64-gcc"  # a compiler that finds no crti.o, as without libc6-dev-arm64-cross
    fake.write_text("#!/bin/sh\necho crti.o\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv(arm.CROSS_CC_ENV, str(fake))
    with pytest.raises(ConfigError, match="has no aarch64 C library to link against; install it with: "
                                          "apt-get install libc6-dev-arm64-cross"):
        arm.check_toolchain()


def test_unreachable_board_is_one_line_with_the_fix(tiny):
    port = _closed_port()
    with pytest.raises(arm.BoardError) as err:
        arm.run_remote(tiny[3], [tiny[1].numpy()], params=tiny[2], rpc=f"127.0.0.1:{port}")
    message = str(err.value)
    assert message.startswith(f"cannot reach the board at 127.0.0.1:{port}: ")
    assert message.endswith("; start one with scripts/emulated-arm-board start")
    assert "\n" not in message and isinstance(err.value, DyncompileError)


@pytest.mark.parametrize("rpc", ["127.0.0.1", "127.0.0.1:notaport", ":9090", "host:70000"])
def test_malformed_board_address_is_a_config_error(tiny, rpc):
    with pytest.raises(ConfigError, match="--rpc wants HOST:PORT"):
        arm.run_remote(tiny[3], [tiny[1].numpy()], rpc=rpc)


def test_tuning_needs_a_board(monkeypatch):
    monkeypatch.delenv(arm.RPC_ENV, raising=False)
    with pytest.raises(ConfigError, match="tuning for arm measures on the board: give --rpc HOST:PORT"):
        arm.tuning_runner()


# ── on the emulated board (marker `arm`) ──

@pytest.fixture(scope="module")
def board():
    """HOST:PORT of an emulated Cortex-A72 board started for this test module (its own name) and stopped after."""
    name = f"pytest-{os.getpid()}"
    started = subprocess.run([str(BOARD_SCRIPT), "start", "--name", name], capture_output=True, text=True,
                             timeout=1200)
    if started.returncode != 0:
        if "missing host packages" in started.stderr and os.geteuid() != 0:
            pytest.skip(started.stderr.strip().splitlines()[-1])
        pytest.fail(f"scripts/emulated-arm-board start failed:\n{started.stderr}")
    address = started.stdout.strip().splitlines()[-1]
    try:
        yield address
    finally:
        subprocess.run([str(BOARD_SCRIPT), "stop", "--name", name], capture_output=True, timeout=60)


@pytest.mark.arm
def test_tiny_net_on_the_emulated_board_matches_pytorch(tiny, board):
    model, x, weights, lib = tiny
    for seed in (0, 1):  # two inputs, each in its own session
        xi = x if seed == 0 else torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = [t.numpy() for t in model(xi)]
        got = arm.run_remote(lib, [xi.numpy()], params=weights, rpc=board)
        assert [g.shape for g in got] == [e.shape for e in expected]  # the tuple, flattened in order
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=0, atol=1e-4)


@pytest.mark.arm
def test_board_keeps_serving_after_a_failed_call_and_times_on_the_board(tiny, board):
    model, x, weights, lib = tiny
    with pytest.raises(arm.BoardError, match="running 'no_such_function' on the board at"):
        arm.run_remote(lib, [x.numpy()], params=weights, rpc=board, function_name="no_such_function")
    with arm.remote_vm(lib, rpc=board) as vm:
        first = vm.run("main", [x.numpy(), *weights])
        again = vm.run("main", [x.numpy(), *weights])  # one session, several calls
        seconds = vm.time("main", [x.numpy(), *weights], number=3, repeat=2)
    np.testing.assert_array_equal(first[0], again[0])
    assert len(seconds) == 2 and all(0 < s < 10 for s in seconds)


@pytest.mark.arm
def test_tuple_parameters_reach_the_board_and_inputs_come_back_unchanged(tuple_lib, board):
    # RPC passes tensors as borrowed pointers; a tuple built from them, returned as is, broke the session
    a, b = np.arange(3, dtype="float32"), np.full((2, 2), 1.5, dtype="float32")
    with arm.remote_vm(tuple_lib, rpc=board) as vm:
        for _ in range(2):  # and the session still works afterwards
            got_a, doubled = vm.run("pick", [[a, b]])
            np.testing.assert_array_equal(got_a, a)
            np.testing.assert_array_equal(doubled, 2 * b)


@pytest.mark.arm
def test_code_for_a_cpu_the_board_lacks_fails_there_in_one_line_and_the_board_keeps_serving(sve_lib, tiny, board):
    # Why the board emulates the real CPU: qemu's default CPU has SVE and would run this library.
    x = np.ones(1024, dtype="float32")
    with pytest.raises(arm.BoardError, match="the board's session crashed \\(an illegal instruction") as err:
        arm.run_remote(sve_lib, [x, x], rpc=board)
    assert "\n" not in str(err.value)
    model, x, weights, lib = tiny
    with torch.no_grad():
        expected = model(x)[0].numpy()
    np.testing.assert_allclose(arm.run_remote(lib, [x.numpy()], params=weights, rpc=board)[0], expected,
                               rtol=0, atol=1e-4)
