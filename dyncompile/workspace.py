"""The workspace: what `convert` leaves for `verify`, `inspect`, `search` and `build` (no path needed later).

    dyncompile-workspace/
      workspace.json        spec: model source, input shape, groups, channel sets and groups, checksums
      graph.json            the traced model's graph (dyncompile.graph_io: no pickle)
      graph.tensors.pt      its weights (read with torch.load(weights_only=True))
      reference.pt          an input and the *original* model's output on it (weights_only)

Opening a workspace never unpickles code. Files are written to temporary names and moved into place,
`workspace.json` last: it carries the SHA-256 of every other file, so a half-written or tampered workspace is
refused with one clear line instead of being half-trusted. The slimmable model is rebuilt on load by running
the (deterministic) analysis on the stored graph, and checked against the stored spec. The one exception to
"data only": modules the user kept opaque with `--leaf` are the model's own code; they are rebuilt by
importing the factory named at convert time (their weights still come from the workspace).
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import dyncompile
from dyncompile.errors import WorkspaceError
from dyncompile.fileio import check_checksums, read_json, replace_durably, sha256_file as _sha256, write_errors
from dyncompile.graph_io import is_safe_module, load_graph_module, save_graph_module
from dyncompile.ir import DynGraph
from dyncompile.loading import ModelSource, import_factory
from dyncompile.pipeline import ANALYSIS_PASSES, AnalysisOptions

__all__ = ["DEFAULT_WORKSPACE", "Workspace", "save_workspace", "load_workspace"]

DEFAULT_WORKSPACE = "dyncompile-workspace"
FORMAT_VERSION = 1
SPEC_FILE = "workspace.json"
GRAPH_FILES = ("graph.json", "graph.tensors.pt")
REFERENCE_FILE = "reference.pt"


@dataclass
class Workspace:
    path: Path
    spec: dict
    dg: DynGraph
    reference: tuple[torch.Tensor, Any]  # an input, and the original model's output: a tensor or a tuple of them


def _set_record(s) -> dict:
    return {**s.to_json(), "class_ids": s.classes, "group_class_ids": s.groups}


def save_workspace(path: str | Path, dg: DynGraph, source: ModelSource, reference: tuple[torch.Tensor, torch.Tensor],
                   *, leaf_modules: tuple[str, ...], grouped_conv_mode: str, macs: int, params: int) -> Path:
    """Write (or replace) the convert outputs of a workspace, atomically per file, spec last."""
    path = Path(path)
    with write_errors(path, "an existing workspace there is unchanged"):
        return _save_workspace(path, dg, source, reference, leaf_modules=leaf_modules,
                               grouped_conv_mode=grouped_conv_mode, macs=macs, params=params)


def _save_workspace(path: Path, dg: DynGraph, source: ModelSource, reference: tuple[torch.Tensor, torch.Tensor],
                    *, leaf_modules: tuple[str, ...], grouped_conv_mode: str, macs: int, params: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    external = _external_modules(dg, leaf_modules, source)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=path))
    try:
        save_graph_module(dg.gm, staging, name="graph", external=external)
        torch.save({"input": reference[0], "output": reference[1]}, staging / REFERENCE_FILE)
        files = {name: _sha256(staging / name) for name in (*GRAPH_FILES, REFERENCE_FILE)}
        spec = {
            "format": FORMAT_VERSION,
            "dyncompile": dyncompile.__version__,
            "torch": torch.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": source.to_json(),
            "input_shape": list(dg.input_shape),
            "groups": dg.num_groups,
            "group_multiple": dg.group_multiple,
            "leaf_modules": list(leaf_modules),
            "external_modules": sorted(external),
            "grouped_conv_mode": grouped_conv_mode,
            "trace_mode": dg.trace_mode,
            "num_classes": dg.num_classes,
            "macs": macs,
            "params": params,
            "sets": [_set_record(s) for s in dg.sets],
            "fixed_reasons": dg.fixed_reasons,
            "coupling_edges": [{"a": a, "b": b, "via": d.get("via", [])[:3]} for a, b, d in dg.coupling.edges(data=True)],
            "files": files,
        }
        (staging / SPEC_FILE).write_text(json.dumps(spec, indent=1))
        for name in (*files, SPEC_FILE):
            replace_durably(staging / name, path / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _external_modules(dg: DynGraph, leaf_modules: tuple[str, ...], source: ModelSource) -> set[str]:
    """User leaf modules that cannot be stored as data: the workspace rebuilds them from the model's code."""
    external = {q for q in leaf_modules if not is_safe_module(dg.gm.get_submodule(q))}
    if external and source.kind == "pickle":
        raise WorkspaceError(f"--leaf module '{sorted(external)[0]}' is the model's own code, which a workspace can "
                             f"rebuild only from a factory: convert a state dict with --arch package.module:factory")
    return external


def _rebuild_external(spec: dict) -> dict:
    """Import the model's factory (named by the user at convert) to get its leaf modules back."""
    names = spec.get("external_modules") or []
    if not names:
        return {}
    model = spec["model"]
    model = import_factory(model["arch"] if model["kind"] == "state_dict" else model["location"])
    return {q: model.get_submodule(q) for q in names}


def read_spec(path: str | Path) -> dict:
    path = Path(path)
    spec_path = path / SPEC_FILE
    if not spec_path.is_file():
        hint = "run `dyncompile convert MODEL` first" if not path.exists() else "it was not made by `dyncompile convert`"
        raise WorkspaceError(f"no workspace at '{path}' ({hint}); or pass --workspace DIR")
    spec = read_json(spec_path, WorkspaceError, "re-run `dyncompile convert`")
    if not isinstance(spec, dict) or spec.get("format") != FORMAT_VERSION:
        raise WorkspaceError(f"'{spec_path}' has an unknown format; re-run `dyncompile convert` with this version")
    check_checksums(path, spec.get("files", {}), WorkspaceError,
                    missing="workspace file '{file}' is missing; re-run `dyncompile convert`",
                    changed="workspace file '{file}' was changed after convert (SHA-256 mismatch); "
                            "re-run `dyncompile convert`")
    return spec


def load_workspace(path: str | Path = DEFAULT_WORKSPACE) -> Workspace:
    """Open a workspace: check checksums, load the graph without pickle, redo and check the analysis."""
    path = Path(path)
    spec = read_spec(path)
    gm = load_graph_module(path, name="graph", external=_rebuild_external(spec))
    dg = DynGraph(gm=gm, input_shape=tuple(spec["input_shape"]), trace_mode=spec["trace_mode"],
                  leaf_modules=tuple(spec["leaf_modules"]))
    options = AnalysisOptions(spec["groups"], spec["grouped_conv_mode"], spec.get("group_multiple", 1))
    for _, _, run_pass in ANALYSIS_PASSES:  # the stored graph is already lifted: this redoes the analysis
        dg = run_pass(dg, options)
    stored = [(s["name"], s["producers"], s["class_ids"], s["group_class_ids"]) for s in spec["sets"]]
    fresh = [(s.name, s.producers, s.classes, s.groups) for s in dg.sets]
    if stored != fresh:
        raise WorkspaceError(f"the stored graph no longer analyses to the stored channel sets (made by dyncompile "
                             f"{spec['dyncompile']}); re-run `dyncompile convert`")
    try:
        ref = torch.load(path / REFERENCE_FILE, map_location="cpu", weights_only=True)
        reference = (ref["input"], ref["output"])
    except Exception as exc:  # noqa: BLE001
        raise WorkspaceError(f"cannot read '{path / REFERENCE_FILE}' ({type(exc).__name__}); re-run `dyncompile convert`") from None
    return Workspace(path=path, spec=spec, dg=dg, reference=reference)
