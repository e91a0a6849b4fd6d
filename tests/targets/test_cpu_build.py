"""Target `cpu`: build a multi-width deployable, load it, run every sub-net, refuse what does not match.

One untuned build of ResNet-20 (4 widths, ~35 s on 2 busy cores) is shared by the default tests; the
MetaSchedule test is `slow`.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import dyncompile.runtime as runtime
from dyncompile.bench import kernel_times
from dyncompile.build import build, uniform_subnets
from dyncompile.deployable import (LIBRARY, MANIFEST, WEIGHTS, DeployableError, ParamSlice, read_manifest,
                                   record_latencies, write_deployable)
from dyncompile.errors import ConfigError
from dyncompile.measure import count_macs
from dyncompile.passes.extract import extract_subnet
from dyncompile.pipeline import analyse_model
from dyncompile.targets import UnknownTargetError, cpu, get_target, known_targets
from dyncompile.targets.llvm_common import physical_cores
from dyncompile.targets.pipeline import entry_module, prepare
from dyncompile.targets.relax_import import import_subnet
from dyncompile.targets.tuning import by_tuning_value, next_round_size, tune
from dyncompile.zoo import ZOO
from dyncompile.zoo import build as build_zoo_model


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Default BN statistics (0 mean, unit variance) would hide a wrongly sliced statistic."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomise_norms(build_zoo_model("resnet20-cifar").eval())
    dg = analyse_model(model, ZOO["resnet20-cifar"].input_shape)
    subnets = uniform_subnets(dg)
    result = build(dg, subnets, target="cpu")
    out = write_deployable(tmp_path_factory.mktemp("deploy") / "cpu", result, dg, model={"zoo": "resnet20-cifar"})
    return dg, subnets, result, out


@pytest.fixture
def copy_of(built, tmp_path):
    def copy():
        dst = tmp_path / "copy"
        shutil.copytree(built[3], dst)
        return dst
    return copy


def _flip_byte(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0xFF
    path.write_bytes(bytes(data))


# ── the registry ──

def test_registry_knows_cpu_and_names_the_known_targets_for_an_unknown_one():
    assert "cpu" in known_targets()
    assert get_target("cpu").name == "cpu"
    with pytest.raises(UnknownTargetError, match="unknown target 'tpu'; known targets: ") as err:
        get_target("tpu")
    assert "cpu" in str(err.value).split("known targets: ")[1].split(", ")
    assert issubclass(UnknownTargetError, ConfigError)


def test_cpu_target_is_llvm_for_this_host():
    import tvm

    target = get_target("cpu").tvm_target()
    assert target.kind.name == "llvm"
    assert str(target.attrs["mcpu"]) == tvm.target.codegen.llvm_get_system_cpu()
    assert int(target.attrs["num-cores"]) == physical_cores()
    with pytest.raises(ConfigError, match="does not know the CPU"):
        get_target("cpu").tvm_target(mcpu="no-such-cpu")


def test_bad_build_arguments_are_one_line_config_errors(built):
    dg, subnets = built[0], built[1]
    with pytest.raises(ConfigError, match="unknown target"):
        build(dg, subnets, target="tpu")
    with pytest.raises(ConfigError, match="tuning needs a database folder"):
        build(dg, subnets, tune_trials=4)
    with pytest.raises(ConfigError, match="--tune-minutes must be > 0"):
        build(dg, subnets, tune_trials=4, tune_minutes=0, tuning_dir="unused")
    with pytest.raises(ConfigError, match="not usable as a function name"):
        build(dg, {"w-50": subnets["w50"]})


# ── correctness ──

def test_every_subnet_matches_pytorch(built):
    dg, subnets, _, out = built
    model = runtime.load(out, device="cpu")
    assert [s.name for s in model.subnets] == ["w100", "w75", "w50", "w25"]
    x = torch.randn(1, 3, 32, 32)
    for name, config in subnets.items():
        with torch.no_grad():
            expected = extract_subnet(dg, config).eval()(x)
        got = model.run(x, subnet=name)
        assert isinstance(got, torch.Tensor)
        assert torch.allclose(got, expected, atol=1e-4, rtol=0), name
        as_numpy = model.run(x.numpy(), subnet=name)  # numpy in, numpy out
        assert isinstance(as_numpy, np.ndarray) and np.allclose(as_numpy, expected.numpy(), atol=1e-4, rtol=0)


def test_calls_on_a_cpu_run_under_the_thread_guard(built, monkeypatch):
    """Every call is timed by the process's guard over TVM's pool (`dyncompile.thread_guard`); a model loaded with
    the guard turned off has none."""
    from dyncompile import thread_guard

    monkeypatch.delenv(thread_guard.GUARD_ENV, raising=False)
    model = runtime.load(built[3])
    guard = thread_guard.shared_guard()
    assert model.threads == guard.threads >= 1
    model.run(np.zeros((1, 3, 32, 32), np.float32), subnet="w25")
    assert (id(model), "w25") in guard._fastest  # the guard timed the call
    monkeypatch.setenv(thread_guard.GUARD_ENV, "off")
    assert runtime.load(built[3]).threads is None



_THREAD_AFFINITIES = """
import os, sys, numpy as np
import dyncompile.runtime as runtime
model = runtime.load(sys.argv[1])
model.run(np.zeros(model.input_shape, np.float32), subnet="w100")
allowed = sorted(os.sched_getaffinity(0))
pinned = [t for t in os.listdir("/proc/self/task") if sorted(os.sched_getaffinity(int(t))) != allowed]
print(len(os.listdir("/proc/self/task")), len(pinned), os.environ.get("TVM_BIND_THREADS"))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin a thread to one of them")
def test_tvm_workers_are_left_to_the_scheduler(built):
    """TVM pins its worker k to core k but not the calling thread, which then shares core 1 with worker 1 at
    random and runs at half speed (llvm_common.use_all_cores); a loaded deployable's threads are all unpinned."""
    env = {k: v for k, v in os.environ.items() if k != "TVM_BIND_THREADS"}
    got = subprocess.run([sys.executable, "-c", _THREAD_AFFINITIES, str(built[3])], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    threads, pinned, bind = int(got[0]), int(got[1]), got[2]
    assert threads >= 2 and pinned == 0 and bind == "0"
def test_input_shape_is_checked(built):
    model = runtime.load(built[3])
    with pytest.raises(DeployableError, match="batch size is fixed"):
        model.run(np.zeros((2, 3, 32, 32), np.float32), subnet="w50")
    with pytest.raises(DeployableError, match="no sub-net 'w10'"):
        model.run(np.zeros((1, 3, 32, 32), np.float32), subnet="w10")


def test_weights_of_are_what_the_compiled_function_takes(built):
    """What benchmarks/latency.py's profiler calls the VM with: the input, then `weights_of(name)`."""
    import tvm

    dg, subnets, _, out = built
    model = runtime.load(out)
    x = torch.randn(1, 3, 32, 32)
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(out / "model.so")), tvm.cpu())
    got = vm["w50"](tvm.runtime.tensor(x.numpy()), *model.weights_of("w50"))
    got = (got[0] if not hasattr(got, "numpy") else got).numpy()
    with torch.no_grad():
        expected = extract_subnet(dg, subnets["w50"]).eval()(x).numpy()
    assert np.allclose(got, expected, atol=1e-4, rtol=0)
    with pytest.raises(DeployableError, match="no sub-net 'w10'"):
        model.weights_of("w10")
    # the profiler: every kernel the call ran, positive time, largest first, no VM builtins
    times = kernel_times(vm, "w50", [tvm.runtime.tensor(x.numpy()), *model.weights_of("w50")], calls=3)
    assert times and all(us > 0 and not name.startswith("vm.") for name, us in times)
    assert [us for _, us in times] == sorted((us for _, us in times), reverse=True)
    assert any("conv2d" in name for name, _ in times)


# ── the artifact ──

def test_one_folder_one_library_weights_once(built):
    dg, _, result, out = built
    assert sorted(p.name for p in out.iterdir()) == sorted([LIBRARY, WEIGHTS, MANIFEST])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "staging folders left behind"
    full_bytes = sum(t.numel() * t.element_size() for t in dg.gm.state_dict().values())
    subnet_bytes = sum(sum(int(np.prod(p.shape)) * 4 for p in s.parameters) for s in result.subnets)
    weights_on_disk = (out / WEIGHTS).stat().st_size
    # ~1× the full model (npz adds a small header per tensor), far below the sum over sub-nets (~1.9×)
    assert full_bytes <= weights_on_disk <= 1.05 * full_bytes + 200 * len(dg.gm.state_dict())
    assert weights_on_disk < 0.6 * subnet_bytes
    assert all(s.embedded_bytes <= 0.01 * full_bytes for s in result.subnets), "weights compiled into the library"


def test_manifest_round_trip(built):
    import tvm

    dg, subnets, result, out = built
    manifest = read_manifest(out).to_json()  # the file's format, key by key
    assert manifest == json.loads((out / MANIFEST).read_text())  # the typed manifest loses nothing
    assert manifest["target"]["name"] == "cpu" and manifest["target"]["device"] == "cpu"
    assert manifest["target"]["mcpu"] == tvm.target.codegen.llvm_get_system_cpu()
    assert manifest["versions"]["tvm"] == tvm.__version__ and manifest["versions"]["torch"] == torch.__version__
    assert manifest["input"] == {"shape": [1, 3, 32, 32], "dtype": "float32", "batch_size": 1}
    assert manifest["model"] == {"zoo": "resnet20-cifar"}
    assert set(manifest["files"]) == {LIBRARY, WEIGHTS}
    full = runtime.read_weights(out, read_manifest(out))  # in the model's layout (views of transposed tensors)
    for record in manifest["subnets"]:
        config = subnets[record["name"]]
        assert record["config"] == config and record["function"] == record["name"]
        assert record["latency_ms"] is None and record["accuracy"] is None
        sub = extract_subnet(dg, config).eval()
        assert record["macs"] == count_macs(sub, (1, 3, 32, 32))
        assert record["params"] == sum(p.numel() for p in sub.parameters())
        state = sub.state_dict()
        for p_json in record["parameters"]:
            p = ParamSlice.from_json(p_json)
            assert ParamSlice.from_json(json.loads(json.dumps(p.to_json()))) == p
            expected = state[p.source].numpy()
            if p.layout is not None:  # read whole and in place: the kernel takes the sub-net's corner itself
                expected = p.layout.store(full[p.source])
                corner = tuple(slice(0, n) for n in state[p.source].shape)
                assert np.array_equal(p.layout.unstore(expected)[corner], state[p.source].numpy())
            assert np.array_equal(p.cut(full[p.source]), expected), (record["name"], p.source)
    # the recipe is what lets narrower sub-nets reuse the full tensors: w50 cuts BN vectors out of them and reads
    # every conv and dense weight whole, as the full width does
    w50 = next(r for r in manifest["subnets"] if r["name"] == "w50")
    assert any(i is not None for p in w50["parameters"] for i in p["index"])
    weights = [p for p in w50["parameters"] if p["source"].endswith("weight") and len(p["shape"]) > 1]
    assert weights and all(p.get("layout") and all(i is None for i in p["index"]) for p in weights)
    stored = manifest["weights"]["tensors"]
    assert all(stored[p["source"]]["layout"] == p["layout"] and stored[p["source"]]["shape"] == p["shape"]
               for p in weights)


def test_subnets_read_one_shared_copy_of_each_weight(built):
    """Issue 11's memory goal: every sub-net's conv and dense weights are the same buffers, so all sub-nets
    together hold the weights about once (not 1 + 0.56 + 0.25 + 0.06 times)."""
    dg, _, _, out = built
    model = runtime.load(out)
    held = {name: {t.data_ptr(): t.numel() * 4 for t in model.weights_of(name)} for name in model.names}
    in_every_subnet = set.intersection(*(set(h) for h in held.values()))
    assert len(in_every_subnet) == 23  # ResNet-20's 21 convs, its classifier's weight and its bias (uncut)
    everything = {ptr: size for h in held.values() for ptr, size in h.items()}
    full_bytes = sum(t.numel() * t.element_size() for t in dg.gm.state_dict().values() if t.is_floating_point())
    assert sum(everything.values()) <= 1.1 * full_bytes



def test_rewriting_replaces_atomically_and_never_a_foreign_folder(built, tmp_path):
    dg, _, result, _ = built
    out = write_deployable(tmp_path / "cpu", result, dg)
    (out / "stale.txt").write_text("from the previous build")
    write_deployable(out, result, dg)  # replaces the existing deployable as a whole
    assert sorted(p.name for p in out.iterdir()) == sorted([LIBRARY, WEIGHTS, MANIFEST])
    read_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu"]
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(DeployableError, match="is not a deployable"):
        write_deployable(foreign, result, dg)
    assert (foreign / "cat.jpg").read_bytes() == b"meow"


# ── refusals ──

@pytest.mark.parametrize("file", [LIBRARY, WEIGHTS])
def test_a_flipped_byte_is_refused(copy_of, file):
    path = copy_of()
    _flip_byte(path / file)
    with pytest.raises(DeployableError, match=f"'{path / file}' does not match its manifest") as err:
        runtime.load(path)
    assert "\n" not in str(err.value)


def test_weights_from_another_model_are_refused(copy_of):
    path = copy_of()
    with np.load(path / WEIGHTS, allow_pickle=False) as npz:
        other = {k: np.zeros_like(npz[k]) for k in npz.files}
    np.savez(path / WEIGHTS, **other)
    with pytest.raises(DeployableError, match="SHA-256 mismatch"):
        runtime.load(path)


def test_a_missing_file_or_manifest_is_refused(copy_of, tmp_path):
    path = copy_of()
    (path / LIBRARY).unlink()
    with pytest.raises(DeployableError, match="is missing"):
        runtime.load(path)
    with pytest.raises(DeployableError, match="no deployable at"):
        runtime.load(tmp_path / "nowhere")


def _edit_manifest(path, edit):
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_rpc_is_only_for_targets_that_run_on_boards(built):
    with pytest.raises(ConfigError, match="--rpc is for boards"):
        runtime.load(built[3], rpc="127.0.0.1:9")


def test_a_deployable_for_another_target_is_refused(copy_of, built):
    with pytest.raises(DeployableError, match="not for device 'cuda'"):
        runtime.load(built[3], device="cuda")
    path = copy_of()
    _edit_manifest(path, lambda m: m["target"].update(name="cuda", device="cuda"))
    with pytest.raises(DeployableError, match="built for target 'cuda'"):
        runtime.load(path, device="cpu")
    _edit_manifest(path, lambda m: m["target"].update(name="cpu", device="cpu", mtriple="aarch64-linux-gnu"))
    with pytest.raises(DeployableError, match="built for aarch64"):
        runtime.load(path)
    _edit_manifest(path, lambda m: m["target"].update(mtriple="x86_64-linux-gnu",
                                                      isa_features=m["target"]["isa_features"] + ["sse9-imaginary"]))
    with pytest.raises(DeployableError, match="lacks: sse9-imaginary"):
        runtime.load(path)
    _edit_manifest(path, lambda m: (m["target"].update(isa_features=[]), m["versions"].update(tvm="0.19.0")))
    with pytest.raises(DeployableError, match="compiled with TVM 0.19.0"):
        runtime.load(path)


# ── choosing a sub-net by latency budget ──

def test_budget_needs_measured_latencies(built):
    with pytest.raises(DeployableError, match="no measured latencies"):
        runtime.load(built[3]).run(np.zeros((1, 3, 32, 32), np.float32), budget_ms=5.0)


def test_budget_picks_the_largest_subnet_that_fits(copy_of):
    path = copy_of()
    record_latencies(path, {"w100": 4.0, "w75": 2.5, "w50": 1.2, "w25": 0.5}, how={"statistic": "median"})
    model = runtime.load(path)  # the manifest changed, the checksummed files did not
    assert [s.latency_ms for s in model.subnets] == [4.0, 2.5, 1.2, 0.5]
    assert model.select(10) == "w100"
    assert model.select(3.0) == "w75"
    assert model.select(1.2) == "w50"
    assert model.select(0.5) == "w25"
    with pytest.raises(DeployableError, match="no sub-net runs within 0.1 ms; the fastest, 'w25', takes 0.5 ms"):
        model.select(0.1)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model.run(x, budget_ms=3.0), model.run(x, subnet="w75"))
    with pytest.raises(DeployableError, match="not both"):
        model.run(x, subnet="w50", budget_ms=3.0)
    with pytest.raises(DeployableError, match="no sub-net 'w10'"):
        record_latencies(path, {"w10": 1.0})


def test_budget_prefers_accuracy_when_every_subnet_has_one(copy_of):
    path = copy_of()
    record_latencies(path, {"w100": 4.0, "w75": 2.5, "w50": 1.2, "w25": 0.5})
    accuracy = {"w100": 0.91, "w75": 0.92, "w50": 0.89, "w25": 0.80}  # a searched w75 may beat w100
    _edit_manifest(path, lambda m: [s.update(accuracy=accuracy[s["name"]]) for s in m["subnets"]])
    assert runtime.load(path).select(10) == "w75"


def test_measured_latency_is_positive_and_recordable(built, copy_of):
    model = runtime.load(built[3])
    ms = model.latency_ms("w25", repeat=5, warmup=1)
    assert ms > 0
    path = copy_of()
    record_latencies(path, {"w25": ms})
    assert runtime.load(path).select(ms) == "w25"


# ── tuning (slow) ──

# ── tuning under a time budget ──

def test_tuning_rounds_are_sized_to_fit_the_time_budget():
    assert next_round_size(40, 0, 5.0, None) == 40  # no budget: one round of everything
    assert next_round_size(40, 0, 5.0, 240.0) == 2  # a first round to learn the pace
    assert next_round_size(1, 0, 5.0, 240.0) == 1
    assert next_round_size(38, 2, 20.0, 240.0) == 22  # 10 s a kernel, 220 s left
    assert next_round_size(5, 2, 20.0, 240.0) == 5
    assert next_round_size(16, 24, 235.0, 240.0) == 0  # not even one more fits
    assert next_round_size(16, 24, 300.0, 240.0) == 0  # overrun


def test_each_subnets_heaviest_kernel_is_tuned_first():
    import tvm
    from tvm.s_tir import meta_schedule as ms

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    dg = analyse_model(model, (1, 3, 16, 16), groups=4)
    target = get_target("cpu").tvm_target()
    widths = uniform_subnets(dg)
    functions = {name: import_subnet(dg, name, widths[name])[0] for name in ("w100", "w50")}
    mod = prepare(tvm.IRModule(functions), target)
    tasks = ms.relax_integration.extract_tasks(entry_module(mod, list(functions)), target)
    per_subnet = [ms.relax_integration.extract_tasks(entry_module(mod, [name]), target) for name in functions]
    ordered = by_tuning_value(tasks, per_subnet)
    assert len(ordered) == len(tasks) >= 6
    # the second convolution (8→32 channels at w100, 4→16 at w50) carries most of each sub-net's arithmetic
    assert all("conv2d" in t.task_name for t in ordered[:2])
    assert {t.task_name for t in ordered[:2]} == {max(subnet, key=_flops).task_name for subnet in per_subnet}


def _flops(task) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    return estimate_tir_flops(task.dispatched[0]) * task.weight


def _two_conv_net(width: int):
    """A net small enough to tune in a slow test: two 3×3 convolutions (16 then `width` channels) and a head."""
    torch.manual_seed(0)
    model = _randomise_norms(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval())
    return analyse_model(model, (1, 3, 16, 16), groups=4)


@pytest.mark.slow
def test_tuning_is_applied_and_the_database_reused(tmp_path):
    """8 trials per kernel on one small sub-net (~3 min on 2 cores); a second build tunes nothing."""
    dg = _two_conv_net(16)
    subnets = {"w50": uniform_subnets(dg)["w50"]}
    tuning_dir = tmp_path / "workspace" / "tuning" / "cpu"
    first = build(dg, subnets, tune_trials=8, tuning_dir=tuning_dir)
    assert first.tuning.tuned == first.tuning.tasks > 0 and first.tuning.reused == 0
    assert first.subnets[0].tuned_kernels == first.subnets[0].kernels > 0
    assert (tuning_dir / "database_tuning_record.json").stat().st_size > 0

    second = build(dg, subnets, tune_trials=8, tuning_dir=tuning_dir)
    assert second.tuning.tuned == 0 and second.tuning.reused == first.tuning.tasks
    assert second.subnets[0].tuned_kernels == second.subnets[0].kernels

    out = write_deployable(tmp_path / "deploy", second, dg)
    assert read_manifest(out).subnets[0].tuned_kernels == second.subnets[0].kernels
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = extract_subnet(dg, subnets["w50"]).eval()(x)
    assert torch.allclose(runtime.load(out).run(x, subnet="w50"), expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_each_kernel_reaches_the_database_before_the_next_is_built(tmp_path):
    """MetaSchedule commits a task's records when it joins the task; tuned together, every task is joined only
    after all were built and measured, so a kill lost everything. Kernel by kernel, the first kernel's records
    (and the ledger) are on disk before a second kernel's candidates are built. ~1 min on 2 cores."""
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    dg = _two_conv_net(16)
    func, _ = import_subnet(dg, "w50", uniform_subnets(dg)["w50"])
    target = cpu.tvm_target()
    mod = prepare(tvm.IRModule({"w50": func}), target)
    inner = cpu.tuning_builder()
    batches = []

    @derived_object
    class CountingBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs):
            batches.append(len(build_inputs))
            return inner.build(build_inputs)

    records = tmp_path / "database_tuning_record.json"
    seen_at_first_join = []

    def progress(stage: str, message: str) -> None:
        if stage == "tune" and "trials (" in message and not seen_at_first_join:
            lines = [ln for ln in records.read_text().splitlines() if ln.strip()] if records.is_file() else []
            seen_at_first_join.append((len(batches), len(lines), (tmp_path / "tasks.json").is_file()))

    try:
        report = tune(mod, ["w50"], target, "cpu", tmp_path, 2, builder=CountingBuilder(), progress=progress)
    finally:
        inner.close()
    # per kernel: one build of its default schedule (one candidate, measured and committed first), then its batch
    assert report.tuned == report.tasks >= 3 and len(batches) >= 2 * report.tasks and batches[0] == 1
    built, committed, ledger_written = seen_at_first_join[0]
    assert built == 2 and committed >= 2 and ledger_written, seen_at_first_join


@pytest.mark.slow
def test_a_time_budget_tunes_the_heaviest_kernels_and_a_later_build_the_rest(tmp_path):
    """A budget shorter than the first round: two kernels are tuned, the others are left for later
    (recorded in the manifest); the same build without a budget tunes exactly those. ~3 min on 2 cores."""
    dg = _two_conv_net(32)
    subnets = {"w100": uniform_subnets(dg)["w100"]}
    tuning_dir = tmp_path / "tuning"
    boxed = build(dg, subnets, tune_trials=4, tune_minutes=0.05, tuning_dir=tuning_dir)
    assert boxed.tuning.tuned == 2 and boxed.tuning.left_for_time == boxed.tuning.tasks - 2 > 0
    assert boxed.subnets[0].tuned_kernels == 2
    out = write_deployable(tmp_path / "deploy", boxed, dg)
    assert read_manifest(out).tuning.left_for_time == boxed.tuning.left_for_time

    rest = build(dg, subnets, tune_trials=4, tuning_dir=tuning_dir)
    assert rest.tuning.reused == 2 and rest.tuning.tuned == boxed.tuning.left_for_time
    assert rest.subnets[0].tuned_kernels == rest.subnets[0].kernels
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = extract_subnet(dg, subnets["w100"]).eval()(x)
    got = runtime.load(write_deployable(tmp_path / "deploy2", rest, dg)).run(x, subnet="w100")
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow  # one MobileNetV2 build: 30-120 s on 2 busy cores
def test_mobilenet_v2_subnet_weights_are_all_cut_from_the_full_tensors(tmp_path):
    """MobileNetV2 at width 0.75 (depthwise and projection convs, channels in search order): every weight of the
    sub-net is an index-list cut of a full tensor, so the deployable stores no copy of its own, and it matches
    PyTorch. (The build's old, separate index probe stored six of these weights as copies; extract's one probe
    finds them to be plain cuts. The copy path stays for a cut that is not one: see the test below.)"""
    torch.manual_seed(0)
    model = _randomise_norms(build_zoo_model("mobilenetv2-cifar").eval())
    dg = analyse_model(model, ZOO["mobilenetv2-cifar"].input_shape)
    subnets = uniform_subnets(dg, (0.75,))
    result = build(dg, subnets, target="cpu")
    assert not [p.source for p in result.subnets[0].parameters if p.source.startswith("@w75/")]
    out = write_deployable(tmp_path / "cpu", result, dg)
    with np.load(out / WEIGHTS, allow_pickle=False) as npz:
        assert not [name for name in npz.files if name.startswith("@")]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = extract_subnet(dg, subnets["w75"]).eval()(x)
    assert torch.allclose(runtime.load(out).run(x, subnet="w75"), expected, atol=1e-4, rtol=0)


class _RolledConv(nn.Module):
    """A user's 1×1 conv whose layer rule cuts its weight row by row differently (each output row's kept inputs
    rolled by its position): a cut no index list per dim can describe."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = cin, cout, 1
        self.weight = nn.Parameter(torch.randn(cout, cin, 1, 1))

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight)


def test_a_cut_that_is_no_outer_product_is_stored_as_the_subnets_own_copy(tmp_path):
    """extract refuses such a cut as a recipe (ExtractionError) unless asked to gather it; the build then stores
    the gathered tensor as the sub-net's own (`@<sub-net>/<tensor>`), and the compiled sub-net still matches."""
    from dyncompile.errors import ExtractionError
    from dyncompile.layer_rules import ConvRule, register_layer_rule, unregister_layer_rule
    from dyncompile.passes.extract import extract_with_indices

    class RolledRule(ConvRule):
        def extract(self, module, in_idx, out_idx):
            new = super().extract(module, in_idx, out_idx)
            rolled = torch.stack([row.roll(i, 0) for i, row in enumerate(new.weight.detach())])
            new.weight = nn.Parameter(rolled)
            return new

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _RolledConv(8, 8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    register_layer_rule(_RolledConv, RolledRule())
    try:
        torch.manual_seed(0)
        dg = analyse_model(model, (1, 3, 8, 8), groups=4, leaf_modules=("2",))
        config = uniform_subnets(dg)["w50"]
        with pytest.raises(ExtractionError, match="not an outer-product slice"):
            extract_with_indices(dg, config)
        sub, recipes = extract_with_indices(dg, config, allow_non_slices=True)
        assert recipes["2.weight"] is None and recipes["0.weight"] is not None
        _, record = import_subnet(dg, "w50", config)
        assert [p.source for p in record.parameters if p.source.startswith("@w50/")] == ["@w50/2.weight"]
        built = build(dg, {"w50": config}, target="cpu")
        out = write_deployable(tmp_path / "cpu", built, dg)
        x = torch.randn(1, 3, 8, 8)
        with torch.no_grad():
            expected = sub(x)
        assert torch.allclose(runtime.load(out).run(x, subnet="w50"), expected, atol=1e-4, rtol=0)
        with np.load(out / WEIGHTS, allow_pickle=False) as npz:
            assert "@w50/2.weight" in npz.files
    finally:
        unregister_layer_rule(_RolledConv)
