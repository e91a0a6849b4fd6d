"""Target `cuda`: ResNet-20 sub-nets compiled by TVM's CUDA code generator with dlight schedules, without a GPU;
the generated CUDA C compiled to PTX by nvcc (when installed); and, on a machine with a GPU, every sub-net run
and compared with PyTorch (skipped cleanly where `tvm.cuda().exist` is False)."""

import re
import shutil
import subprocess

import pytest
import torch

import dyncompile.runtime as runtime
from dyncompile.build import build, uniform_subnets
from dyncompile.deployable import LIBRARY, DeployableError, read_manifest, write_deployable
from dyncompile.errors import ConfigError
from dyncompile.passes.extract import extract_subnet
from dyncompile.pipeline import analyse_model
from dyncompile.targets import TargetKind, get_target
from dyncompile.targets import cuda
from dyncompile.zoo import ZOO
from dyncompile.zoo import build as build_zoo_model

KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(')


def _gpu() -> bool:
    import tvm

    return bool(tvm.cuda(0).exist)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.manual_seed(0)
    model = build_zoo_model("resnet20-cifar").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5)
    dg = analyse_model(model, ZOO["resnet20-cifar"].input_shape)
    subnets = uniform_subnets(dg, (1.0, 0.5))
    result = build(dg, subnets, target="cuda")
    out = write_deployable(tmp_path_factory.mktemp("deploy") / "cuda", result, dg)
    return dg, subnets, result, out


def test_cuda_is_registered_with_the_target_interface():
    kind = get_target("cuda")
    assert kind is cuda and kind.device == "cuda"
    for member in TargetKind.__annotations__:
        assert hasattr(kind, member), member
    for function in ("tvm_target", "describe", "check_toolchain", "schedule_passes", "lower_passes",
                     "tensor_intrinsics", "tuning_builder", "tuning_runner", "export_library", "check_runnable"):
        assert callable(getattr(kind, function)), function


def test_arch_option():
    target = cuda.tvm_target()
    assert target.kind.name == "cuda" and str(target.attrs["arch"]) == "sm_80"
    assert target.host.kind.name == "llvm"
    assert str(cuda.tvm_target(arch="sm_90").attrs["arch"]) == "sm_90"
    assert cuda.describe(cuda.tvm_target(arch="sm_86"))["compute_capability"] == "8.6"
    for bad in ("80", "sm80", "compute_80", ""):
        with pytest.raises(ConfigError, match="--arch wants a CUDA architecture"):
            cuda.tvm_target(arch=bad)


def test_every_subnet_compiles_to_cuda_kernels_in_one_library(built):
    _, subnets, result, out = built
    source = cuda.device_sources(result.executable)["cu"]
    kernels = sorted(set(KERNEL.findall(source)))
    assert any(k.startswith("fused_conv2d") for k in kernels)
    # dlight scheduled them: threads and blocks are bound (an unscheduled kernel would not compile for cuda)
    assert "threadIdx.x" in source and "blockIdx.x" in source
    # one device kernel per fused kernel of every sub-net (each sub-net's own, in the one library)
    assert all(s.kernels > 0 for s in result.subnets)
    assert len(kernels) >= max(s.kernels for s in result.subnets)
    text = result.executable.as_text()
    for name in subnets:
        assert f"@{name}" in text and f"@{name}_transform_params" in text, name
    manifest = read_manifest(out)
    assert manifest.target.name == "cuda" and manifest.target.get("arch") == "sm_80"
    assert (out / LIBRARY).stat().st_size > 0
    assert kernels[0].encode() in (out / LIBRARY).read_bytes(), "the device code travels inside the library"


@pytest.mark.slow  # nvcc takes 10-30 s on 2 cores
@pytest.mark.skipif(not shutil.which("nvcc"), reason="nvcc not installed")
def test_generated_cuda_compiles_to_ptx_for_the_arch(built, tmp_path):
    source = cuda.device_sources(built[2].executable)["cu"]
    (tmp_path / "kernels.cu").write_text(source)
    subprocess.run(["nvcc", "--ptx", "-arch=compute_80", "-o", str(tmp_path / "kernels.ptx"),
                    str(tmp_path / "kernels.cu")], check=True, capture_output=True, timeout=300)
    ptx = (tmp_path / "kernels.ptx").read_text()
    assert ".target sm_80" in ptx
    entries = set(re.findall(r"\.entry (\w+)\(", ptx))
    assert entries == set(KERNEL.findall(source))


@pytest.mark.skipif(_gpu(), reason="this machine has a GPU")
def test_without_a_gpu_the_deployable_is_refused_with_the_reason(built):
    with pytest.raises(DeployableError, match="no CUDA GPU is visible here"):
        runtime.load(built[3], device="cuda")
    # without a driver TVM cannot compile kernels at build time: they travel as CUDA C (see targets/cuda.py)
    expected = "binary" if cuda._runtime_loaded() else "source"
    assert read_manifest(built[3]).target.get("device_code") == expected
    with pytest.raises(ConfigError, match="tuning for cuda measures candidates on a GPU"):
        cuda.tuning_runner()


@pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU (tvm.cuda().exist)")
def test_every_subnet_matches_pytorch_on_the_gpu(built):
    dg, subnets, _, out = built
    model = runtime.load(out, device="cuda")
    x = torch.randn(1, 3, 32, 32)
    for name, config in subnets.items():
        with torch.no_grad():
            expected = extract_subnet(dg, config).eval()(x)
        assert torch.allclose(model.run(x, subnet=name), expected, atol=1e-4, rtol=0), name
        assert model.latency_ms(name, repeat=10) > 0
