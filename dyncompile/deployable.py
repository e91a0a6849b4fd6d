"""The multi-width deployable: one folder per target, written atomically, checked on load.

    <out>/                      e.g. dyncompile-workspace/deploy/cpu/
      model.so                  ONE library: per sub-net a function `<name>` and its `<name>_transform_params`
      weights.npz               the FULL model's tensors, once (plain .npz, read with allow_pickle=False)
      manifest.json             format, target, versions, input/output, sub-nets, SHA-256 of every file

Each sub-net's record in the manifest carries its config, MACs, params, measured latency (null until a
bench fills it), accuracy (null until search fills it) and its slicing recipe: for every input of its
`_transform_params` function, the full tensor it is cut from and the kept indices per dim. So the disk holds
about 1× the full model's weights whatever the number of sub-nets; `dyncompile.runtime` cuts them at load.

BatchNorm is stored unfolded (as the model has it): the library's `<name>_transform_params` computes each
BN's scale and shift from the sliced tensors once at load. A searched sub-net has its own BN statistics: they
are extra small tensors in weights.npz, named `@<sub-net>/<tensor>` and already cut to the sub-net's width,
and its recipe points to them (only where they differ from the full model's).

The folder is staged next to its destination, fsync'ed, and renamed into place; the manifest is written last
and holds the SHA-256 of every other file, so a half-written, tampered or mixed-up deployable is refused.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import faulthandler
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import dyncompile
from dyncompile.errors import DyncompileError
from dyncompile.fileio import check_checksums, fsync_path, read_json, sha256_file, write_atomic, write_errors
from dyncompile.targets import get_target

__all__ = ["DeployableError", "StoredLayout", "ParamSlice", "DeployedSubnet", "TargetFacts", "InputSpec",
           "TensorSpec", "WeightsFile", "TuningSummary", "Manifest", "FORMAT_VERSION", "MANIFEST", "LIBRARY",
           "WEIGHTS", "default_output", "own_tensor_key", "write_deployable", "read_manifest", "record_latencies"]

FORMAT_VERSION = 3
# 1: each sub-net had one "output"; 2: a list of "outputs" (dense prediction); 3: weights stored in the layout the
# kernels read in place ("layout" on tensors), and inputs that are whole stored tensors
READABLE_FORMATS = (1, 2, 3)
KIND = "dyncompile-deployable"
MANIFEST = "manifest.json"
LIBRARY = "model.so"
WEIGHTS = "weights.npz"


class DeployableError(DyncompileError):
    """A deployable is missing, malformed, changed on disk, or made for another target."""


@dataclass(frozen=True)
class StoredLayout:
    """How a weight is stored for kernels that read it whole and in place (targets/shared_weights.py): the model's
    tensor transposed by `axes`, then, with `block`, its last dim split into blocks of `block` moved to the front
    (a conv weight O,I,KH,KW with axes (1,2,3,0) and block 16: O/16, I, KH, KW, 16)."""

    axes: tuple[int, ...]
    block: int | None = None

    def shape(self, full: tuple[int, ...]) -> tuple[int, ...]:
        out = tuple(full[a] for a in self.axes)
        return out if self.block is None else (out[-1] // self.block, *out[:-1], self.block)

    def store(self, array: np.ndarray) -> np.ndarray:
        out = array.transpose(self.axes)
        if self.block is not None:
            out = np.moveaxis(out.reshape(*out.shape[:-1], out.shape[-1] // self.block, self.block), -2, 0)
        return np.ascontiguousarray(out)

    def unstore(self, stored: np.ndarray) -> np.ndarray:
        """The model's tensor back (a view when there is no block)."""
        out = stored
        if self.block is not None:
            out = np.moveaxis(out, 0, -2)
            out = out.reshape(*out.shape[:-2], -1)
        return out.transpose(np.argsort(self.axes))

    def to_json(self) -> dict:
        return {"axes": list(self.axes), "block": self.block}

    @classmethod
    def from_json(cls, d: dict | None) -> StoredLayout | None:
        return None if d is None else cls(tuple(d["axes"]), d.get("block"))


@dataclass(frozen=True)
class ParamSlice:
    """One input of a sub-net's Relax function: which full-model tensor it is cut from, and how.

    ``index[d]`` lists the kept indices along dim d of the full tensor (None: all of them); the slice is the
    outer product of these lists (``np.take`` dim by dim), exactly the tensor `extract_subnet` produced, then
    put in ``layout`` when given (a whole tensor its kernels read in place: targets/shared_weights.py).
    """

    name: str  # the Relax parameter, e.g. "p_layer1_0_conv1_weight"
    source: str  # the full model's tensor, e.g. "layer1.0.conv1.weight"
    index: tuple[tuple[int, ...] | None, ...]
    shape: tuple[int, ...]
    dtype: str
    layout: StoredLayout | None = None

    def to_json(self) -> dict:
        out = {"name": self.name, "source": self.source, "shape": list(self.shape), "dtype": self.dtype,
               "index": [None if i is None else list(i) for i in self.index]}
        if self.layout is not None:
            out["layout"] = self.layout.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict) -> ParamSlice:
        return cls(d["name"], d["source"], tuple(None if i is None else tuple(i) for i in d["index"]),
                   tuple(d["shape"]), d["dtype"], StoredLayout.from_json(d.get("layout")))

    def is_prefix(self) -> bool:
        """Whether the cut keeps the first indices along every dim (then a kernel can read it in place)."""
        return all(i is None or i == tuple(range(len(i))) for i in self.index)

    @property
    def key(self) -> tuple:
        """Two inputs with the same key are the same tensor: the runtime keeps one copy for both."""
        return self.source, self.index, self.layout

    def reads_stored(self, spec: TensorSpec) -> bool:
        """Whether this input is the stored tensor `spec` describes, as it is (no cut, same layout)."""
        return self.layout is not None and self.layout == spec.layout and all(i is None for i in self.index)

    def cut(self, full: np.ndarray) -> np.ndarray:
        out = full
        for dim, idx in enumerate(self.index):
            if idx is not None:
                out = np.take(out, idx, axis=dim)
        return np.ascontiguousarray(out) if self.layout is None else self.layout.store(out)


def own_tensor_key(subnet: str, source: str) -> str:
    """The deployable's name for sub-net `subnet`'s own copy of tensor `source` (e.g. its BN running_mean)."""
    return f"@{subnet}/{source}"


# ── the manifest, typed: one record per thing it describes; `to_json` writes the on-disk format unchanged ──

@dataclass(frozen=True)
class DeployedSubnet:
    """One sub-net of a deployable: its functions in the library, its size, what is measured, its weight recipe."""

    name: str
    function: str  # the library's Relax function that runs it
    transform_function: str | None  # run once at load on its cut weights (BN scale/shift); None: none needed
    config: dict[str, int]
    macs: int  # per image
    params: int
    latency_ms: float | None  # measured on the target (None until a bench records it)
    accuracy: float | None  # from search (None until search records it)
    kernels: int
    tuned_kernels: int
    embedded_bytes: int
    outputs: tuple[TensorSpec, ...]  # what `function` returns, in order: one tensor, or several (a detector's)
    parameters: tuple[ParamSlice, ...]  # the inputs of `transform_function` (or of `function`), in order
    # the same sub-net in other engines (ONNX Runtime, eager PyTorch), ms, timed in the same run as latency_ms
    peer_latency_ms: dict[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_build(cls, s: Any, accuracy: float | None) -> DeployedSubnet:
        """From a `SubnetBuild` (what the build learned about the sub-net)."""
        return cls(s.name, s.function, s.transform_function, dict(s.config), s.macs, s.params, None, accuracy,
                   s.kernels, s.tuned_kernels, s.embedded_bytes, tuple(s.outputs),
                   tuple(s.parameters))

    def to_json(self) -> dict:
        return {"name": self.name, "function": self.function, "transform_function": self.transform_function,
                "config": self.config, "macs": self.macs, "params": self.params, "latency_ms": self.latency_ms,
                "accuracy": self.accuracy, "kernels": self.kernels, "tuned_kernels": self.tuned_kernels,
                "embedded_bytes": self.embedded_bytes,
                "outputs": [t.to_json() for t in self.outputs],
                "parameters": [p.to_json() for p in self.parameters], "peer_latency_ms": dict(self.peer_latency_ms)}

    @classmethod
    def from_json(cls, d: dict) -> DeployedSubnet:
        return cls(d["name"], d["function"], d.get("transform_function"), dict(d["config"]), int(d["macs"]),
                   int(d["params"]), d.get("latency_ms"), d.get("accuracy"), int(d.get("kernels", 0)),
                   int(d.get("tuned_kernels", 0)), int(d.get("embedded_bytes", 0)),
                   tuple(TensorSpec.from_json(t) for t in (d["outputs"] if "outputs" in d else [d["output"]])),
                   tuple(ParamSlice.from_json(p) for p in d["parameters"]),
                   {str(k): float(v) for k, v in (d.get("peer_latency_ms") or {}).items()})


@dataclass(frozen=True)
class TargetFacts:
    """The target a deployable was compiled for: its registry name, runtime device, and the target module's
    `describe` facts (mcpu, ISA features, CUDA arch …) that its `check_runnable` reads."""

    name: str
    device: str
    facts: dict[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        """One of the target module's facts (they differ per target, so they stay a mapping)."""
        return self.facts.get(key, default)

    def to_json(self) -> dict:
        return {"name": self.name, "device": self.device, **self.facts}

    @classmethod
    def from_json(cls, d: dict) -> TargetFacts:
        facts = {k: v for k, v in d.items() if k not in ("name", "device")}
        return cls(str(d.get("name", "?")), str(d.get("device", "?")), facts)


@dataclass(frozen=True)
class InputSpec:
    """The one input every sub-net takes; the batch size is fixed at build time."""

    shape: tuple[int, ...]
    dtype: str
    batch_size: int

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "batch_size": self.batch_size}

    @classmethod
    def from_json(cls, d: dict) -> InputSpec:
        return cls(tuple(d["shape"]), d["dtype"], int(d["batch_size"]))


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str
    # weights.npz only: the tensor is stored in the layout kernels read in place (targets/shared_weights.py);
    # `shape` is the stored shape
    layout: StoredLayout | None = None
    # weights.npz only: per dim, the model's indices in the order they are stored (None: the model's order), so
    # every sub-net's cut is a prefix (targets/channel_order.py); recipes index the tensor in this order
    channel_order: tuple[tuple[int, ...] | None, ...] | None = None

    def to_json(self) -> dict:
        out = {"shape": list(self.shape), "dtype": self.dtype}
        if self.layout is not None:
            out["layout"] = self.layout.to_json()
        if self.channel_order is not None:
            out["channel_order"] = [None if o is None else list(o) for o in self.channel_order]
        return out

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        order = d.get("channel_order")
        return cls(tuple(d["shape"]), d["dtype"], StoredLayout.from_json(d.get("layout")),
                   None if order is None else tuple(None if o is None else tuple(o) for o in order))

    def unstored(self, stored: np.ndarray) -> np.ndarray:
        """The tensor in the model's own layout (a view of `stored` unless its layout has blocks), its channels
        still in `channel_order` (the order recipes index)."""
        return stored if self.layout is None else self.layout.unstore(stored)


@dataclass(frozen=True)
class WeightsFile:
    """weights.npz: the full model's tensors once, plus sub-nets' own (`own_tensor_key` names)."""

    file: str
    bytes: int
    tensors: dict[str, TensorSpec]

    def to_json(self) -> dict:
        return {"file": self.file, "bytes": self.bytes,
                "tensors": {k: t.to_json() for k, t in self.tensors.items()}}

    @classmethod
    def from_json(cls, d: dict) -> WeightsFile:
        return cls(d.get("file", WEIGHTS), int(d.get("bytes", 0)),
                   {k: TensorSpec.from_json(t) for k, t in d["tensors"].items()})


@dataclass(frozen=True)
class TuningSummary:
    """How the library's kernels were tuned (None in the manifest for an untuned build)."""

    trials_per_task: int
    kernels: int  # distinct kernels over all sub-nets
    tuned_now: int
    reused: int
    time_budget_s: float | None
    left_for_time: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TuningSummary:
        return cls(d["trials_per_task"], d["kernels"], d["tuned_now"], d["reused"], d.get("time_budget_s"),
                   d.get("left_for_time", 0))

    @classmethod
    def of(cls, report: Any) -> TuningSummary | None:
        """The summary of a build's `TuningReport` (targets/tuning.py); None for an untuned build."""
        if report is None:
            return None
        return cls(report.trials_per_task, report.tasks, report.tuned, report.reused, report.time_budget_s,
                   report.left_for_time)


@dataclass(frozen=True)
class Manifest:
    """manifest.json of a deployable (see the module docstring); `read_manifest` gives one, checked."""

    created: str
    versions: dict[str, str]  # dyncompile, tvm, torch, numpy
    target: TargetFacts
    model: dict[str, Any]  # facts about the source model as the builder gave them (workspace, its SHA-256 …)
    input: InputSpec
    library: str
    weights: WeightsFile
    tuning: TuningSummary | None
    latency: dict[str, Any] | None  # how `latency_ms` was measured (where, statistic, repeats …), once recorded
    search: dict[str, Any] | None  # the search result the sub-nets come from {"method", "result_sha256", …}
    subnets: tuple[DeployedSubnet, ...]  # most MACs first
    files: dict[str, str]  # file → SHA-256

    def subnet(self, name: str) -> DeployedSubnet:
        """The sub-net called `name`; DeployableError naming the others if there is none."""
        for s in self.subnets:
            if s.name == name:
                return s
        raise DeployableError(f"no sub-net '{name}'; sub-nets: {', '.join(s.name for s in self.subnets)}")

    def to_json(self) -> dict:
        return {"format": FORMAT_VERSION, "kind": KIND, "created": self.created, "versions": self.versions,
                "target": self.target.to_json(), "model": self.model, "input": self.input.to_json(),
                "library": self.library, "weights": self.weights.to_json(),
                "tuning": None if self.tuning is None else self.tuning.to_json(), "latency": self.latency,
                "search": self.search, "subnets": [s.to_json() for s in self.subnets], "files": self.files}

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        return cls(d.get("created", ""), dict(d.get("versions") or {}), TargetFacts.from_json(d.get("target") or {}),
                   dict(d.get("model") or {}), InputSpec.from_json(d["input"]), d.get("library", LIBRARY),
                   WeightsFile.from_json(d["weights"]),
                   None if d.get("tuning") is None else TuningSummary.from_json(d["tuning"]), d.get("latency"),
                   d.get("search"), tuple(DeployedSubnet.from_json(s) for s in d.get("subnets", [])),
                   dict(d.get("files") or {}))


_NUMBER_LIST = re.compile(r"\[\s*((?:-?[\d.e+-]+|null)(?:,\s*(?:-?[\d.e+-]+|null))*)\s*\]")


def _dumps(manifest: dict) -> str:
    """Indented JSON with lists of numbers on one line (index lists would otherwise take a line per int)."""
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
                            json.dumps(manifest, indent=1))


def default_output(workspace: str | Path, target_name: str) -> Path:
    """Where `dyncompile build` puts a target's deployable unless told otherwise."""
    return Path(workspace) / "deploy" / target_name


def _versions() -> dict:
    import torch
    import tvm

    return {"dyncompile": dyncompile.__version__, "tvm": tvm.__version__, "torch": torch.__version__,
            "numpy": np.__version__}


def _export_in_child(export, executable, path: Path) -> None:
    """Run `export(executable, path)` in a forked child.

    LLVM aborts the whole process when it cannot write an object file ("LLVM ERROR: IO failure on output
    stream"), so a full disk would end a build with a crash instead of one line. In a child, the abort is the
    child's: its OSError (or the abort, with LLVM's message) comes back here as an OSError that the caller's
    `write_errors` turns into one line, and the child's stderr is replayed only when export succeeded.
    """
    if not hasattr(os, "fork"):
        export(executable, str(path))
        return
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile() as child_stderr:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: export, report, never return into the caller's code
            code = 3
            try:
                os.close(read_end)
                os.dup2(child_stderr.fileno(), 2)
                faulthandler.disable()  # a crash here is reported by the parent, not dumped on the terminal
                try:
                    export(executable, str(path))
                    message = "ok"
                except OSError as exc:
                    message = f"oserror\n{exc.errno or 0}\n{exc.strerror or exc}"
                except BaseException as exc:  # noqa: BLE001
                    message = f"error\n{type(exc).__name__}: {exc}"
                os.write(write_end, message.encode()[:60000])
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        child_stderr.seek(0)
        printed = child_stderr.read().decode(errors="replace")
    kind, _, detail = message.partition("\n")
    if kind == "ok" and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        sys.stderr.write(printed)
        return
    if kind == "oserror":
        number, _, reason = detail.partition("\n")
        raise OSError(int(number) or errno.EIO, reason)
    if kind == "error":
        raise DeployableError(f"exporting the compiled library failed: {detail.splitlines()[0] if detail else ''}")
    # the child died inside export (LLVM exits or aborts on a write failure): its stderr says why
    last = next((ln for ln in reversed(printed.splitlines()) if ln.strip()), "no message")
    if "IO failure" in printed or "too large" in printed or "No space" in printed:
        raise OSError(errno.ENOSPC, f"the compiler could not write the library ({last.strip()})")
    how = (f"signal {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
           else f"exit status {os.WEXITSTATUS(status)}")
    raise DeployableError(f"exporting the compiled library ended with {how}: {last.strip()}")


def write_deployable(out: str | Path, result, dg, *, model: dict | None = None,
                     accuracy: dict[str, float] | None = None, search: dict | None = None) -> Path:
    """Write `result` (a `dyncompile.build.BuildResult`) and `dg`'s full weights as a deployable at `out`.

    Replaces an existing deployable there; refuses to replace a folder that is not one. `model`: facts
    about the source model to record (e.g. the workspace's model spec). `accuracy`: per sub-net, from search;
    `search`: which search result the sub-nets come from (recorded as given).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise DeployableError(f"'{out}' exists and is not a deployable; choose another output folder (-o)")
    with write_errors(out, "an existing deployable there is unchanged"):
        return _write_deployable(out, result, dg, model=model, accuracy=accuracy, search=search)


def _write_deployable(out: Path, result, dg, *, model: dict | None, accuracy: dict[str, float] | None,
                      search: dict | None) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        order = result.channel_order
        full = {k: v.detach().cpu().numpy() for k, v in dg.gm.state_dict().items()}
        if order is not None:
            full = {k: order.store(k, v) for k, v in full.items()}
        for s in result.subnets:
            clash = sorted(set(s.own_tensors) & set(full))
            if clash:
                raise DeployableError(f"sub-net '{s.name}' tensor '{clash[0]}' clashes with a model tensor name")
            full.update(s.own_tensors)
        layouts = _stored_layouts(result.subnets)
        for name, layout in layouts.items():
            full[name] = layout.store(full[name])
        with open(staging / WEIGHTS, "wb") as f:
            np.savez(f, **full)
        _export_in_child(get_target(result.target_name).export_library, result.executable, staging / LIBRARY)
        files = {name: sha256_file(staging / name) for name in (LIBRARY, WEIGHTS)}
        manifest = Manifest(
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            versions=_versions(),
            target=TargetFacts(result.target_name, get_target(result.target_name).device, dict(result.target_facts)),
            model=model or {},
            input=InputSpec(tuple(result.input_shape), result.input_dtype, result.batch_size),
            library=LIBRARY,
            weights=WeightsFile(WEIGHTS, int(sum(a.nbytes for a in full.values())),
                                {k: TensorSpec(tuple(a.shape), str(a.dtype), layouts.get(k),
                                               None if order is None else order.stored_order(k))
                                 for k, a in full.items()}),
            tuning=TuningSummary.of(result.tuning),
            latency=None,  # how latency_ms was measured, once a bench recorded it
            search=search,
            subnets=tuple(sorted((DeployedSubnet.from_build(s, (accuracy or {}).get(s.name)) for s in result.subnets),
                                 key=lambda r: -r.macs)),
            files=files,
        )
        (staging / MANIFEST).write_text(_dumps(manifest.to_json()))
        for name in (*files, MANIFEST):
            fsync_path(staging / name)
        fsync_path(staging)
        # A folder cannot be renamed over a non-empty one: move the old deployable aside first, back on failure.
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "deployable")
        try:
            os.rename(staging, out)
        except OSError:
            if old is not None:
                os.rename(old / "deployable", out)
            raise
        fsync_path(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _stored_layouts(subnets: list) -> dict[str, StoredLayout]:
    """Tensors to store in a kernel's layout: those every sub-net reading them whole reads in the same layout
    (so each sub-net's input is the stored tensor itself, loaded once; see targets/shared_weights.py)."""
    layouts: dict[str, StoredLayout | None] = {}
    for s in subnets:
        for p in s.parameters:
            if p.layout is not None:
                layouts[p.source] = p.layout if layouts.get(p.source, p.layout) == p.layout else None
    return {name: layout for name, layout in layouts.items() if layout is not None}


def read_manifest(path: str | Path, *, verify_files: bool = True) -> Manifest:
    """The manifest of the deployable at `path`, after checking its format and every file's SHA-256."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise DeployableError(f"no deployable at '{path}' (no {MANIFEST}); run `dyncompile build` first")
    raw = read_json(manifest_path, DeployableError, "rebuild the deployable")
    if not isinstance(raw, dict) or raw.get("kind") != KIND:
        raise DeployableError(f"'{manifest_path}' is not a dyncompile deployable manifest")
    if raw.get("format") not in READABLE_FORMATS:
        raise DeployableError(f"deployable '{path}' has format {raw.get('format')}, this dyncompile reads "
                              f"{FORMAT_VERSION}; rebuild it with this version")
    try:
        manifest = Manifest.from_json(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DeployableError(f"'{manifest_path}' is malformed ({type(exc).__name__}: {exc}); rebuild the "
                              f"deployable") from None
    if verify_files:
        check_checksums(path, manifest.files, DeployableError,
                        missing="deployable file '{file}' is missing; rebuild the deployable",
                        changed="deployable file '{file}' does not match its manifest (SHA-256 mismatch: "
                                "changed or from another build); rebuild the deployable")
        missing = {LIBRARY, WEIGHTS} - set(manifest.files)
        if missing:
            raise DeployableError(f"the manifest of '{path}' has no checksum for {sorted(missing)[0]}; rebuild it")
    return manifest


def record_latencies(path: str | Path, latencies: dict[str, float], *, how: dict | None = None,
                     peers: dict[str, dict[str, float]] | None = None) -> Manifest:
    """Store measured latencies (ms, per sub-net name) in the manifest, atomically; returns the new manifest.

    `how`: how they were measured (device, batch, repeats, statistic), recorded once for all of them. `peers`:
    per sub-net, the other engines' latencies from the same run (replacing earlier ones: a new run, new peers).
    """
    path = Path(path)
    manifest = read_manifest(path)
    names = {s.name for s in manifest.subnets}
    unknown = sorted(set(latencies) - names)
    if unknown:
        raise DeployableError(f"no sub-net '{unknown[0]}' in '{path}'; sub-nets: {', '.join(sorted(names))}")
    subnets = []
    for s in manifest.subnets:
        if s.name in latencies:
            value = float(latencies[s.name])
            if not value > 0:
                raise DeployableError(f"latency of '{s.name}' must be positive, got {value}")
            s = dataclasses.replace(s, latency_ms=value,
                                    peer_latency_ms={e: float(ms) for e, ms in (peers or {}).get(s.name, {}).items()})
        subnets.append(s)
    manifest = dataclasses.replace(manifest, subnets=tuple(subnets), latency=how or manifest.latency or {})
    with write_errors(path / MANIFEST, "the deployable is unchanged"):
        write_atomic(path / MANIFEST, _dumps(manifest.to_json()).encode("utf-8"))
    return manifest
