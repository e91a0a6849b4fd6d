"""Run a deployable: every sub-net ready at once, switched per call with no reload, here or on a board.

    import dyncompile.runtime
    model = dyncompile.runtime.load("dyncompile-workspace/deploy/cpu")    # device="cpu"
    model.subnets                        # [SubnetInfo(name='w100', macs=40813184, ...), ...], most MACs first
    y = model.run(x, subnet="w50")       # x: numpy array or torch tensor; y: the same kind
    y = model.run(x, budget_ms=1.0)      # the most accurate sub-net whose measured latency fits

    with dyncompile.runtime.load("dyncompile-workspace/deploy/arm", rpc="127.0.0.1:9090") as board:
        y = board.run(x, subnet="w50")   # runs on the board over TVM RPC (targets with `remote_vm`: arm)
        board.latency_ms("w50")          # timed on the board

`load` checks every file's SHA-256 before it loads the library (loading a library runs its code), refuses a
deployable built for another device or a CPU this one cannot run, reads each weight once (a weight the sub-nets
read whole, in place, is one buffer for all of them; others are cut per sub-net), runs each sub-net's
`_transform_params` once, and creates one VirtualMachine. Only TVM's
runtime is used here (no Relax, no torch needed), so this also runs where only the runtime is installed.
Over RPC the library is uploaded once per session; the board serves one session at a time, so close the
model (or use `with`) when done.
"""

from __future__ import annotations

import contextlib
import hashlib
import statistics
import time
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dyncompile.deployable import (LIBRARY, WEIGHTS, DeployableError, DeployedSubnet, Manifest, ParamSlice,
                                   read_manifest)
from dyncompile.targets import UnknownTargetError, check_board_for, get_target
from dyncompile.thread_guard import shared_guard

__all__ = ["DeployedModel", "LocalModel", "BoardModel", "SubnetInfo", "load", "read_weights", "subnet_inputs"]


class SubnetInfo(NamedTuple):
    name: str
    macs: int  # per image
    params: int
    latency_ms: float | None  # measured on the target (null until a bench records it)
    accuracy: float | None  # from search (null until search records it)


def _device(kind: str) -> Any:
    import tvm

    devices = {"cpu": tvm.cpu, "cuda": tvm.cuda}
    if kind not in devices:
        raise DeployableError(f"unknown device '{kind}'; devices: {', '.join(devices)}")
    return devices[kind](0)


class DeployedModel:
    """A deployable opened for running: choosing a sub-net and checking inputs (from the manifest alone).

    `LocalModel` runs it on this machine, `BoardModel` on a board over RPC; `load` gives the right one.
    """

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest
        self._records = {s.name: s for s in manifest.subnets}
        self.input_shape = tuple(manifest.input.shape)
        self.input_dtype = manifest.input.dtype
        self.target = manifest.target.name

    @property
    def subnets(self) -> list[SubnetInfo]:
        return [SubnetInfo(s.name, s.macs, s.params, s.latency_ms, s.accuracy) for s in self.manifest.subnets]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.manifest.subnets]

    def select(self, budget_ms: float) -> str:
        """The most accurate sub-net whose recorded latency is ≤ `budget_ms`."""
        subnets = self.subnets
        timed = [s for s in subnets if s.latency_ms is not None]
        if not timed:
            raise DeployableError(f"deployable '{self.path}' has no measured latencies; run `dyncompile bench` "
                                  f"on the target first, or choose a sub-net by name")
        fits = [s for s in timed if s.latency_ms <= budget_ms]
        if not fits:
            fastest = min(timed, key=lambda s: s.latency_ms)
            raise DeployableError(f"no sub-net runs within {budget_ms} ms; the fastest, '{fastest.name}', "
                                  f"takes {fastest.latency_ms:.3g} ms")
        return self._most_accurate(fits)

    def most_accurate(self) -> str:
        """The sub-net `run` uses when given neither a name nor a budget."""
        return self._most_accurate(self.subnets)

    def _most_accurate(self, candidates: list[SubnetInfo]) -> str:
        """Highest recorded accuracy when every sub-net has one (search fills it), else most MACs."""
        if all(s.accuracy is not None for s in self.subnets):
            return max(candidates, key=lambda s: (s.accuracy, s.macs)).name
        return max(candidates, key=lambda s: s.macs).name

    def choose(self, subnet: str | None = None, budget_ms: float | None = None) -> str:
        """The sub-net `run(x, subnet, budget_ms=...)` runs: by name, by budget, or the most accurate."""
        if subnet is not None and budget_ms is not None:
            raise DeployableError("give either subnet= or budget_ms=, not both")
        name = self.select(budget_ms) if budget_ms is not None else (subnet or self.most_accurate())
        self._check_name(name)
        return name

    def _check_name(self, subnet: str) -> DeployedSubnet:
        if subnet not in self._records:
            raise DeployableError(f"no sub-net '{subnet}'; sub-nets: {', '.join(self.names)}")
        return self._records[subnet]

    def _array(self, x: Any) -> np.ndarray:
        """`x` as a contiguous numpy array of the deployable's input dtype; DeployableError for another shape."""
        array = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        if tuple(array.shape) != self.input_shape:
            raise DeployableError(f"input shape {tuple(array.shape)} does not match the deployable's "
                                  f"{self.input_shape} (the batch size is fixed at build time)")
        return np.ascontiguousarray(array, dtype=self.input_dtype)

    def _random_input(self) -> np.ndarray:
        return np.random.default_rng(0).standard_normal(self.input_shape).astype(self.input_dtype)

    def run(self, x: Any, subnet: str | None = None, *, budget_ms: float | None = None) -> Any:
        """Run sub-net `subnet` (or the one `select(budget_ms)` picks; neither: the most accurate) on `x`.

        `x` must have the deployable's input shape; a torch tensor gives torch tensors back, anything else
        numpy arrays: one for a sub-net with one output, else a tuple in the model's order (as the PyTorch
        model returns them, e.g. a detector's class logits and box deltas).
        """
        name = self.choose(subnet, budget_ms)
        outputs = self._execute(name, self._array(x))
        if hasattr(x, "detach"):
            import torch

            outputs = [torch.from_numpy(y) for y in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _execute(self, name: str, x: np.ndarray) -> list[np.ndarray]:
        """Every output of sub-net `name` on `x`, tuples flattened depth-first."""
        raise NotImplementedError

    def latency_ms(self, subnet: str, *, repeat: int = 50, warmup: int = 5) -> float:
        """Median time (ms) of one call of `subnet` on a random input, where the model runs."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the model holds open (a board's RPC session); a local model holds nothing."""

    def __enter__(self) -> DeployedModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LocalModel(DeployedModel):
    """A deployable loaded on this machine: one VirtualMachine, every sub-net's weights ready on the device."""

    def __init__(self, path: Path, manifest: Manifest, vm: Any, device: Any, weights: dict[str, list]):
        super().__init__(path, manifest)
        self._vm = vm
        self._device = device
        self._weights = weights
        # CPU calls are synchronous and share TVM's thread pool with whatever else runs: time them (thread_guard.py)
        self._guard = shared_guard() if manifest.target.device == "cpu" else None

    def _input(self, x: Any) -> Any:
        import tvm

        return tvm.runtime.tensor(self._array(x), self._device)

    def _call(self, name: str, x: Any) -> Any:
        function = self._vm[self._records[name].function]
        if self._guard is None:
            return function(x, *self._weights[name])
        key = (id(self), name)
        self._guard.before(key)
        start = time.perf_counter()
        out = function(x, *self._weights[name])
        self._guard.after(key, time.perf_counter() - start)
        return out

    @property
    def threads(self) -> int | None:
        """CPU threads the next call runs with (fewer than the cores while the machine is busy, see
        `dyncompile.thread_guard`); None where the guard is off or the device is not the CPU."""
        return None if self._guard is None else self._guard.threads

    def _execute(self, name: str, x: np.ndarray) -> list[np.ndarray]:
        return _numpy_leaves(self._call(name, self._input(x)))

    def weights_of(self, subnet: str) -> list:
        """Sub-net `subnet`'s weight arguments as its compiled function takes them (on the device, transformed
        once at load): what a profiler passes after the input."""
        self._check_name(subnet)
        return list(self._weights[subnet])

    def prepared(self, subnet: str, x: Any) -> Any:
        """A zero-argument function that runs `subnet` on `x` (copied to the device once) and waits for it:
        what a timing loop calls, so that it measures the sub-net and not the input copy."""
        self._check_name(subnet)
        x_dev = self._input(x)

        def call() -> Any:
            out = self._call(subnet, x_dev)
            self._device.sync()
            return out

        return call

    def latency_ms(self, subnet: str, *, repeat: int = 50, warmup: int = 5) -> float:
        """Median wall time (ms) of one call of `subnet` on a random input already on the device."""
        call = self.prepared(subnet, self._random_input())
        for _ in range(warmup):
            call()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


class BoardModel(DeployedModel):
    """A deployable run on a board over TVM RPC: the library is uploaded when first needed, each sub-net's
    weights are cut here, transformed on the board once and kept there (one copy of each distinct tensor), and
    `close` ends the session."""

    def __init__(self, path: Path, manifest: Manifest, kind: Any, rpc: str):
        super().__init__(path, manifest)
        self.rpc = rpc
        self._kind = kind
        self._full = read_weights(path, manifest)
        self._session = contextlib.ExitStack()
        self._vm: Any = None
        self._weights: dict[str, list] = {}
        self._distinct: dict[tuple, Any] = {}  # content → the tensor on the board

    def _board(self) -> Any:
        if self._vm is None:
            self._vm = self._session.enter_context(self._kind.remote_vm(self.path / LIBRARY, rpc=self.rpc))
        return self._vm

    def _arguments(self, name: str, x: np.ndarray) -> list:
        vm, s = self._board(), self._records[name]
        if name not in self._weights:
            raw = subnet_inputs(s, self._full)
            weights = vm.run(s.transform_function, [raw]) if s.transform_function else raw
            self._weights[name] = [self._on_board(vm, w) for w in weights]
        return [x, *self._weights[name]]

    def _on_board(self, vm: Any, array: np.ndarray) -> Any:
        """`array` uploaded to the board once: the weights all sub-nets read whole come back from each sub-net's
        transform as separate copies of the same tensor; the board gets one, kept for the session."""
        key = (array.shape, str(array.dtype), hashlib.sha1(np.ascontiguousarray(array).data).hexdigest())
        if key not in self._distinct:
            self._distinct[key] = vm.upload(array)
        return self._distinct[key]

    def _execute(self, name: str, x: np.ndarray) -> list[np.ndarray]:
        return self._board().run(self._records[name].function, self._arguments(name, x))

    def latency_ms(self, subnet: str, *, repeat: int = 50, warmup: int = 5) -> float:
        """Median time (ms) of one call of `subnet` measured on the board (its own timer; one warm-up call)."""
        self._check_name(subnet)
        args = self._arguments(subnet, self._random_input())
        seconds = self._board().time(self._records[subnet].function, args, number=1, repeat=repeat)
        return statistics.median(seconds) * 1e3

    def close(self) -> None:
        self._vm = None
        self._weights, self._distinct = {}, {}
        self._session.close()


def _numpy_leaves(value: Any) -> list[np.ndarray]:
    """A VM function's return value (a tensor, or a tuple of them, possibly nested) as numpy arrays, in order."""
    if hasattr(value, "numpy"):
        return [value.numpy()]
    return [a for item in value for a in _numpy_leaves(item)]


def _check_target(path: Path, manifest: Manifest) -> Any:
    """The target module the deployable was built for; DeployableError if this dyncompile does not know it."""
    try:
        return get_target(manifest.target.name)
    except UnknownTargetError:
        raise DeployableError(f"deployable '{path}' was built for target '{manifest.target.name}', which this "
                              f"dyncompile does not know") from None


def load(path: str | Path, device: str = "cpu", rpc: str | None = None) -> DeployedModel:
    """Open the deployable at `path` for `device` (see the module docstring); DeployableError if it cannot.

    `rpc`: "HOST:PORT" of a board's TVM RPC server (targets that run on boards, e.g. arm): the model's `run`
    and `latency_ms` then execute there, and `device` is not used.
    """
    import tvm

    path = Path(path)
    manifest = read_manifest(path)  # every SHA-256 checked before anything is loaded
    target = manifest.target
    kind = _check_target(path, manifest)
    if rpc is not None:
        check_board_for(kind, rpc)
        return BoardModel(path, manifest, kind, rpc)
    if target.device != device:
        raise DeployableError(f"deployable '{path}' was built for target '{target.name}' "
                              f"(device {target.device}), not for device '{device}'; build it with "
                              f"--target for this device")
    why_not = kind.check_runnable(target.to_json())
    if why_not:
        raise DeployableError(f"deployable '{path}' cannot run here: {why_not}; rebuild it on this machine")
    built_with = str(manifest.versions.get("tvm", "?"))
    if built_with.split(".")[:2] != tvm.__version__.split(".")[:2]:  # the VM's bytecode is not a stable format
        raise DeployableError(f"deployable '{path}' was compiled with TVM {built_with} and this runtime is TVM "
                              f"{tvm.__version__}; rebuild it with this version")
    kind.runtime_setup()
    dev = _device(device)
    raw = _device_inputs(path, manifest, dev)
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(path / LIBRARY)), dev)
    weights = {}
    for s in manifest.subnets:
        weights[s.name] = list(vm[s.transform_function](raw[s.name])) if s.transform_function else raw[s.name]
    return LocalModel(path, manifest, vm, dev, weights)


ALIGNMENT = 64  # bytes: what TVM requires of a buffer it takes over without copying
READ_CHUNK = 1 << 20  # bytes read at a time into a weight's final buffer


def _device_inputs(path: Path, manifest: Manifest, dev: Any) -> dict[str, list]:
    """Every sub-net's inputs on `dev`, one tensor per distinct recipe (`ParamSlice.key`): a weight that sub-nets
    read whole (shared_weights.py) is one buffer for all of them. Read tensor by tensor into aligned memory
    that a CPU device takes over as it is, so loading never holds a second copy of the weights."""
    import tvm

    by_source: dict[str, dict[tuple, tuple[str, ParamSlice]]] = {}  # source → recipe key → (first sub-net, input)
    for s in manifest.subnets:
        for p in s.parameters:
            if p.source not in manifest.weights.tensors:
                raise DeployableError(f"sub-net '{s.name}' needs '{p.source}', which '{WEIGHTS}' lacks")
            by_source.setdefault(p.source, {}).setdefault(p.key, (s.name, p))
    tensors = {}
    try:
        with zipfile.ZipFile(path / WEIGHTS) as npz:
            for source, inputs in by_source.items():
                spec = manifest.weights.tensors[source]
                stored = _read_aligned(npz, source, spec, path)
                for key, (subnet, p) in inputs.items():
                    tensors[key] = (_on_device(stored, dev) if p.reads_stored(spec)
                                    else tvm.runtime.tensor(_cut(subnet, p, spec.unstored(stored)), dev))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise DeployableError(f"cannot read '{path / WEIGHTS}' ({type(exc).__name__}); rebuild the deployable") \
            from None
    return {s.name: [tensors[p.key] for p in s.parameters] for s in manifest.subnets}


def _read_aligned(npz: zipfile.ZipFile, name: str, spec: Any, path: Path) -> np.ndarray:
    """Tensor `name` of the open weights.npz, read straight into memory aligned to `ALIGNMENT`."""
    with npz.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = header(f)
        if fortran_order or tuple(shape) != tuple(spec.shape) or str(dtype) != spec.dtype:
            raise DeployableError(f"'{path / WEIGHTS}' does not hold tensor '{name}' as the manifest describes")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buffer = np.empty(nbytes + ALIGNMENT, np.uint8)
        start = -buffer.ctypes.data % ALIGNMENT
        data = buffer[start:start + nbytes]
        view, done = memoryview(data), 0
        while done < nbytes:  # in chunks: a zip member's readinto reads the whole request into a copy first
            got = f.readinto(view[done:done + READ_CHUNK])
            if not got:
                raise DeployableError(f"'{path / WEIGHTS}' ends inside tensor '{name}'; rebuild the deployable")
            done += got
    return data.view(dtype).reshape(shape)


def _cut(subnet: str, p: ParamSlice, full: np.ndarray) -> np.ndarray:
    """Input `p` of sub-net `subnet` cut from its full tensor; DeployableError if the recipe does not fit it."""
    cut = p.cut(full)
    if tuple(cut.shape) != p.shape:
        raise DeployableError(f"sub-net '{subnet}': '{p.source}' cut to {cut.shape}, expected {p.shape}")
    return cut


def _on_device(stored: np.ndarray, dev: Any) -> Any:
    """The stored tensor on `dev`: its own buffer, taken over without a copy, when `dev` is the CPU."""
    import tvm

    if dev.dlpack_device_type() == tvm.cpu(0).dlpack_device_type():
        return tvm.runtime.from_dlpack(stored)
    return tvm.runtime.tensor(stored, dev)


def read_weights(path: str | Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """The tensors of the deployable's weights.npz (full model, plus sub-nets' own), checked against `manifest`,
    each in the model's own layout (a view where it is stored transposed)."""
    path = Path(path)
    try:
        with np.load(path / WEIGHTS, allow_pickle=False) as npz:
            full = {name: npz[name] for name in npz.files}
    except Exception as exc:  # noqa: BLE001 -- zipfile/numpy raise many kinds
        raise DeployableError(f"cannot read '{path / WEIGHTS}' ({type(exc).__name__}); rebuild the deployable") \
            from None
    for name, spec in manifest.weights.tensors.items():
        if name not in full or tuple(full[name].shape) != spec.shape or str(full[name].dtype) != spec.dtype:
            raise DeployableError(f"'{path / WEIGHTS}' does not hold tensor '{name}' as the manifest describes")
        full[name] = spec.unstored(full[name])
    return full


def subnet_inputs(record: DeployedSubnet, full: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Sub-net `record`'s weights, cut from `full` by its recipe, in its function's order."""
    raw = []
    for p in record.parameters:
        if p.source not in full:
            raise DeployableError(f"sub-net '{record.name}' needs '{p.source}', which '{WEIGHTS}' lacks")
        raw.append(_cut(record.name, p, full[p.source]))
    return raw
