"""What `dyncompile search` leaves in the workspace, and how `build` / `report` read it back.

    dyncompile-workspace/search/
      current.json              {"method": "progressive"}: the result `build` uses by default
      <method>/result.json      chosen sub-nets, group order, history, checksums of the files below
      <method>/weights.pt       trained full-width state dict of the traced model (weights_only)
      <method>/bn.pt            per-sub-net BatchNorm statistics {subnet: {bn tensor name: tensor}} (weights_only)

A sub-net is a `SubnetConfig` (set name → number of groups kept) over the sets' groups *in search order*:
the search ranks each set's groups and `group_order[set]` lists the original group indices, most important
first, so every sub-net keeps a prefix and the chain is nested by construction. `apply_result` reorders
`dg.sets[*].groups` accordingly and loads the trained weights, after which every existing pass (keep_mask,
extract_subnet, build) works unchanged. Written atomically (files first, result.json last, carrying their
SHA-256); a changed file is refused on load with one line.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dyncompile.errors import WorkspaceError
from dyncompile.fileio import check_checksums, replace_durably, sha256_file, write_errors
from dyncompile.ir import DynGraph, SubnetConfig, reorder_groups

__all__ = ["SEARCH_DIR", "SubnetRecord", "SearchResult", "subnet_name", "save_search_result", "load_search_result",
           "apply_result", "subnet_weights", "result_dir"]

SEARCH_DIR = "search"
RESULT_FILE = "result.json"
WEIGHTS_FILE = "weights.pt"
BN_FILE = "bn.pt"
CURRENT_FILE = "current.json"
FORMAT_VERSION = 1


@dataclass
class SubnetRecord:
    """One chosen sub-net: its groups per set, cost and accuracy (test split, own BN statistics)."""

    name: str  # `subnet_name(budget)`, e.g. "macs25"
    config: SubnetConfig
    macs: int
    macs_fraction: float
    params: int
    accuracy: float  # on the test split, with this sub-net's own recalibrated BN statistics
    budget: float | None = None  # the requested MACs fraction it was chosen for
    search_accuracy: float | None = None  # on the held-out search split, when the search measured it


@dataclass
class SearchResult:
    method: str  # the search method's registered name: "progressive", "usnet"
    subnets: list[SubnetRecord]
    group_order: dict[str, list[int]]  # set name → original group indices, most important first
    full_accuracy: float | None = None  # the model as given (before search), test split
    options: dict = field(default_factory=dict)  # every option the run used
    history: list[dict] = field(default_factory=list)  # events: ranking, search steps, fine-tunes, timings
    data: dict = field(default_factory=dict)  # dataset, sizes, adaptation notes
    compute: dict = field(default_factory=dict)  # sub-net passes per phase: SearchRun.count_compute
    wall_s: float = 0.0

    def subnet(self, name: str) -> SubnetRecord:
        for s in self.subnets:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> SearchResult:
        d = dict(d)
        d["subnets"] = [SubnetRecord(**s) for s in d["subnets"]]
        return cls(**d)


def subnet_name(budget: float) -> str:
    """The name of the sub-net chosen for a MACs budget: 0.25 → "macs25"."""
    return f"macs{round(budget * 100):d}"


def result_dir(workspace: str | Path, method: str) -> Path:
    return Path(workspace) / SEARCH_DIR / method


def save_search_result(workspace: str | Path, result: SearchResult, state_dict: dict[str, torch.Tensor],
                       bn_statistics: dict[str, dict[str, torch.Tensor]], *, make_current: bool = True) -> Path:
    """Write `<workspace>/search/<method>/` atomically (result.json last) and point current.json at it."""
    with write_errors(result_dir(workspace, result.method), "an earlier search result there is unchanged"):
        return _save_search_result(workspace, result, state_dict, bn_statistics, make_current=make_current)


def _save_search_result(workspace: str | Path, result: SearchResult, state_dict: dict[str, torch.Tensor],
                        bn_statistics: dict[str, dict[str, torch.Tensor]], *, make_current: bool) -> Path:
    out = result_dir(workspace, result.method)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, staging / WEIGHTS_FILE)
        torch.save({n: {k: v.detach().cpu() for k, v in s.items()} for n, s in bn_statistics.items()}, staging / BN_FILE)
        files = {name: sha256_file(staging / name) for name in (WEIGHTS_FILE, BN_FILE)}
        record = {"format": FORMAT_VERSION, **result.to_json(), "files": files}
        (staging / RESULT_FILE).write_text(json.dumps(record, indent=1))
        for name in (*files, RESULT_FILE):
            replace_durably(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if make_current:
        current = Path(workspace) / SEARCH_DIR / CURRENT_FILE
        tmp = current.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"method": result.method}))
            replace_durably(tmp, current)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def load_search_result(workspace: str | Path, method: str | None = None, *, tensors: bool = True
                       ) -> tuple[SearchResult, dict, dict] | None:
    """(result, state_dict, bn_statistics) of `method` (default: the current one), or None if never searched.

    With tensors=False the two dicts are empty (report/inspect need only the JSON)."""
    root = Path(workspace) / SEARCH_DIR
    if method is None:
        current = root / CURRENT_FILE
        if not current.is_file():
            return None
        try:
            method = json.loads(current.read_text())["method"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise WorkspaceError(f"'{current}' is damaged; re-run `dyncompile search`") from None
    path = root / method / RESULT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.pop("format") != FORMAT_VERSION:
            raise ValueError("format")
        files = record.pop("files")
        result = SearchResult.from_json(record)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise WorkspaceError(f"'{path}' is damaged or from another version; re-run `dyncompile search`") from None
    if not tensors:
        return result, {}, {}
    check_checksums(path.parent, files, WorkspaceError,
                    missing="search file '{file}' is missing; re-run `dyncompile search`",
                    changed="search file '{file}' was changed after the search (SHA-256 mismatch); "
                            "re-run `dyncompile search`")
    state = torch.load(path.parent / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    bn = torch.load(path.parent / BN_FILE, map_location="cpu", weights_only=True)
    return result, state, bn


def apply_result(dg: DynGraph, result: SearchResult, state_dict: dict[str, torch.Tensor] | None = None) -> DynGraph:
    """A copy of `dg` whose sets' groups are in search order and whose graph holds the trained weights."""
    new = copy.copy(dg)
    new.gm = copy.deepcopy(dg.gm)
    new.sets = [copy.deepcopy(s) for s in dg.sets]
    try:
        reorder_groups(new, result.group_order)
    except ValueError as e:
        raise WorkspaceError(f"the search result orders channel groups wrongly ({e}); "
                             f"re-run `dyncompile search`") from None
    if state_dict is not None:
        missing = set(new.gm.state_dict()) - set(state_dict)
        if missing:
            raise WorkspaceError(f"search weights lack '{sorted(missing)[0]}'; re-run `dyncompile search`")
        new.gm.load_state_dict(state_dict, strict=False)
    return new


def subnet_weights(dg: DynGraph, bn_statistics: dict[str, dict[str, torch.Tensor]], name: str) -> DynGraph:
    """`dg` with sub-net `name`'s BatchNorm statistics loaded into its graph (for extraction / export)."""
    stats = bn_statistics.get(name)
    if stats is None:
        raise WorkspaceError(f"no BatchNorm statistics stored for sub-net '{name}'; re-run `dyncompile search`")
    return dg.with_tensors(stats)
