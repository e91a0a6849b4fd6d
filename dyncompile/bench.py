"""Measure a deployable: per sub-net latency, error against PyTorch, and (optionally) ONNX Runtime and eager
PyTorch on the same sub-net, interleaved in one run so that a busy machine slows every engine alike.

    from dyncompile.bench import bench_deployable
    rows = bench_deployable("dyncompile-workspace/deploy/cpu", compare=("onnxruntime", "torch"), repeats=50)

The PyTorch reference of a sub-net is the workspace's model extracted for the same config (with the search's
weights and the sub-net's own BatchNorm statistics when it was built from a search result); the deployable
records which workspace and search result it came from, and a changed workspace is refused.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dyncompile import runtime
from dyncompile.deployable import DeployableError, Manifest, read_manifest
from dyncompile.errors import ConfigError, one_line
from dyncompile.ir import output_tensors
from dyncompile.passes.extract import extract_subnet
from dyncompile.subnet_choice import subnets_from_workspace, workspace_facts
from dyncompile.verify import output_error
from dyncompile.workspace import load_workspace

__all__ = ["ENGINES", "default_compare", "kernel_times", "SubnetBench", "interleaved_medians", "onnx_runner",
           "torch_runner", "reference_modules", "bench_deployable"]

ENGINES = ("onnxruntime", "torch")  # what --compare accepts


def default_compare(device: str, rpc: str | None = None) -> tuple[str, ...]:
    """What `bench` compares with unless told: ONNX Runtime (its CPU provider), the engine a user would otherwise
    deploy, when it is installed (the `bench` extra) and the deployable runs on this machine's CPU (`device`, from
    the manifest); nothing for a board or a GPU, whose timings do not compare with this CPU's."""
    import importlib.util

    if rpc or device != "cpu" or not all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx")):
        return ()
    return ("onnxruntime",)


@dataclass
class SubnetBench:
    name: str
    macs: int  # per image
    batch: int
    tvm_ms: float  # median
    max_error: float  # max |TVM - PyTorch| on one random input
    compare_ms: dict[str, float] = field(default_factory=dict)  # engine → median ms, same run
    compare_failed: dict[str, str] = field(default_factory=dict)  # engine → why it could not run this sub-net

    @property
    def gflops(self) -> float:
        return 2 * self.macs * self.batch / (self.tvm_ms * 1e6)

    def to_json(self) -> dict:
        d = asdict(self)
        d["gflops"] = self.gflops
        d["tvm_over"] = {engine: self.tvm_ms / ms for engine, ms in self.compare_ms.items()}
        return d


def interleaved_medians(calls: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 3,
                        block: int = 20, settle_s: float = 0.2) -> dict[str, float]:
    """Milliseconds per call of each zero-argument call: the engines take turns in blocks of `block` timed calls
    (a×20, b×20, a×20, …, `repeats` in all per engine); each block's median, and of those the lowest (the
    least disturbed turn), so that load from other processes hits every engine alike.

    Each engine keeps its own defaults, thread pools that spin after a call included (measured here: TVM's
    workers spin for about 160 ms, ONNX Runtime's for about 45 ms). A spinning pool takes a core from whoever
    runs next, so before each block the loop sleeps `settle_s` until the last engine's pool is idle, and the
    block's first call (which wakes the pool) is not timed.
    """
    for _ in range(warmup):
        for call in calls.values():
            call()
    blocks: dict[str, list[float]] = {k: [] for k in calls}
    done = 0
    while done < repeats:
        size = min(block, repeats - done)
        for k, call in calls.items():
            time.sleep(settle_s)
            call()
            times = []
            for _ in range(size):
                start = time.perf_counter()
                call()
                times.append((time.perf_counter() - start) * 1e3)
            blocks[k].append(statistics.median(times))
        done += size
    return {k: min(v) for k, v in blocks.items()}


def _threads() -> int:
    from dyncompile.targets.llvm_common import physical_cores

    return physical_cores()  # what TVM's deployable uses (`use_all_cores`), and ONNX Runtime's own default


def kernel_times(vm: Any, function: str, args: Sequence[Any], *, calls: int = 20) -> list[tuple[str, float]]:
    """Where a call of the VM's `function` on `args` spends its time: (kernel, µs per call summed over its
    calls), largest first. Each VM call instruction is timed by an instrument; the VM's own builtins (`vm.*`:
    allocation, shape checks) are left out, so wall time minus their sum is the interpreter's share."""
    spent: dict[str, float] = {}
    opened: dict[str, float] = {}

    def instrument(func, symbol, before_run, ret_value, *rest):
        if before_run:
            opened[symbol] = time.perf_counter()
        else:
            spent[symbol] = spent.get(symbol, 0.0) + time.perf_counter() - opened.pop(symbol)
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    try:
        for _ in range(calls):
            vm[function](*args)
    finally:
        vm.set_instrument(None)
    return sorted(((k, v / calls * 1e6) for k, v in spent.items() if not k.startswith("vm.")), key=lambda r: -r[1])


def torch_runner(module: Any, x: np.ndarray) -> Callable[[], Any]:
    import torch

    xt = torch.from_numpy(x)

    def call() -> Any:
        with torch.inference_mode():
            return module(xt)

    return call


def onnx_runner(module: Any, x: np.ndarray, *, threads: int | None = None) -> Callable[[], Any]:
    """`module` exported to ONNX (TorchScript exporter) and run by ONNX Runtime's CPU provider on `x`."""
    try:
        import onnx  # noqa: F401 -- torch.onnx.export needs it
        import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError(f"--compare onnxruntime needs {exc.name}, which is not installed: pip install "
                          f"onnxruntime==1.32.0 onnx==1.23.2 (dyncompile's bench extra)") from None
    import torch

    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, (torch.from_numpy(x),), buffer, dynamo=False, input_names=["x"],
                          output_names=["y"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or _threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # otherwise ONNX Runtime's defaults, spinning threads included
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"x": x})


def reference_modules(manifest: Manifest, workspace: str | Path | None = None) -> dict[str, Any]:
    """The PyTorch sub-nets a deployable was built from, extracted from its workspace (eval mode)."""
    recorded = manifest.model
    workspace = Path(workspace or recorded.get("workspace") or "dyncompile-workspace")
    ws = load_workspace(workspace)
    if recorded.get("workspace_sha256") and workspace_facts(workspace)["workspace_sha256"] != recorded["workspace_sha256"]:
        raise DeployableError(f"the workspace '{workspace}' changed since this deployable was built (another "
                              f"convert); rebuild it, or give the workspace it was built from (--workspace)")
    graphs: Callable[[str], Any] = lambda name: ws.dg  # noqa: E731
    if manifest.search:
        source = subnets_from_workspace(workspace, ws.dg)
        if not source.search or source.search["result_sha256"] != manifest.search.get("result_sha256"):
            raise DeployableError(f"the search result in '{workspace}' is not the one this deployable was built "
                                  f"from; rebuild it with `dyncompile build`")
        graphs = source.reference_graph
    return {s.name: extract_subnet(graphs(s.name), s.config).eval() for s in manifest.subnets}


def bench_deployable(path: str | Path, *, workspace: str | Path | None = None, rpc: str | None = None,
                     compare: Sequence[str] = (), repeats: int = 50, warmup: int = 3, seed: int = 0,
                     progress: Callable[[str], None] | None = None, best_effort: bool = False) -> list[SubnetBench]:
    """Time every sub-net of the deployable at `path` and check it against PyTorch (see the module docstring).

    Locally the engines take turns per repeat; with `rpc` (ARM boards) TVM runs on the board and `compare`
    is refused (timings from two machines do not compare). `best_effort`: an engine that cannot run a sub-net
    (its exporter or session fails) is left out for that sub-net and the reason kept in `compare_failed`, instead
    of ending the bench: for peers the user did not ask for by name.
    """
    import torch

    path = Path(path)
    unknown = [e for e in compare if e not in ENGINES]
    if unknown:
        raise ConfigError(f"--compare knows {', '.join(ENGINES)}, not '{unknown[0]}'")
    if repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {repeats}")
    if rpc and compare:
        raise ConfigError("--compare runs the other engines on this machine; it cannot be combined with --rpc")
    manifest = read_manifest(path)
    modules = reference_modules(manifest, workspace)
    x = np.random.default_rng(seed).standard_normal(manifest.input.shape).astype(manifest.input.dtype)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(_threads())  # the same cores for every engine
    rows = []
    try:
        with runtime.load(path, device=manifest.target.device, rpc=rpc) as model:
            for s in manifest.subnets:
                if progress:
                    progress(s.name)
                with torch.no_grad():
                    expected = output_tensors(modules[s.name](torch.from_numpy(x)))
                got = output_tensors(model.run(torch.from_numpy(x), subnet=s.name))
                if rpc:  # measured on the board by its own timer
                    tvm_ms, compare_ms = model.latency_ms(s.name, repeat=repeats), {}
                else:
                    calls, failed = {"tvm": model.prepared(s.name, x)}, {}
                    for engine in compare:
                        try:
                            calls[engine] = (onnx_runner if engine == "onnxruntime" else torch_runner)(
                                modules[s.name], x)
                        except Exception as exc:  # noqa: BLE001 -- exporters and sessions raise anything
                            if not best_effort or isinstance(exc, ConfigError):
                                raise
                            failed[engine] = one_line(exc, 160)
                    compare_ms = interleaved_medians(calls, repeats=repeats, warmup=warmup)
                    tvm_ms = compare_ms.pop("tvm")
                rows.append(SubnetBench(s.name, s.macs, manifest.input.batch_size, tvm_ms,
                                        output_error(got, expected), compare_ms,
                                        {} if rpc else failed))
    finally:
        torch.set_num_threads(threads_before)
    return rows
