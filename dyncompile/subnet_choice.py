"""Which sub-nets a build compiles: the searched ones from a workspace, or uniform widths.

    from dyncompile.subnet_choice import subnets_from_workspace, uniform_subnets
    chosen = subnets_from_workspace("dyncompile-workspace", ws.dg)   # the search's sub-nets if a search ran
    configs = uniform_subnets(dg, (1.0, 0.5))                        # {"w100": …, "w50": …}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dyncompile.errors import ConfigError
from dyncompile.fileio import sha256_file
from dyncompile.ir import DynGraph, SubnetConfig, uniform_config
from dyncompile.search.result import RESULT_FILE, apply_result, load_search_result, result_dir
from dyncompile.workspace import SPEC_FILE

__all__ = ["DEFAULT_WIDTHS", "WorkspaceSubnets", "uniform_subnets", "subnets_from_workspace",
           "workspace_facts"]

DEFAULT_WIDTHS = (1.0, 0.75, 0.5, 0.25)


def uniform_subnets(dg: DynGraph, widths: tuple[float, ...] = DEFAULT_WIDTHS) -> dict[str, SubnetConfig]:
    """Sub-nets at uniform widths, named "w100", "w75", …; a width whose config repeats an earlier one is skipped."""
    out: dict[str, SubnetConfig] = {}
    for w in widths:
        config = uniform_config(dg, w)
        if config not in out.values():
            out[f"w{round(w * 100)}"] = config
    return out


@dataclass
class WorkspaceSubnets:
    """What `dyncompile build` compiles from a workspace: the searched sub-nets if a search ran, else uniform widths."""

    dg: DynGraph  # with the search's group order and trained weights applied, when there is a search result
    configs: dict[str, SubnetConfig]
    own_tensors: dict[str, dict[str, torch.Tensor]]  # per sub-net BN statistics (search); empty for uniform widths
    accuracy: dict[str, float]  # from search
    search: dict | None  # {"method", "full_accuracy", "result_sha256"} of the search result used, or None
    notes: list[str]

    def reference_graph(self, name: str) -> DynGraph:
        """`dg` with sub-net `name`'s own tensors loaded: `extract_subnet` of it is the PyTorch sub-net."""
        return self.dg.with_tensors(self.own_tensors.get(name))


def subnets_from_workspace(workspace: str | Path, dg: DynGraph, widths: tuple[float, ...] | None = None
                           ) -> WorkspaceSubnets:
    """The sub-nets to build for the workspace at `workspace` (whose graph is `dg`).

    With a search result (`dyncompile search`) and no `widths`: its sub-nets, its group order and trained
    weights, each sub-net with its own BatchNorm statistics, and its accuracies. Otherwise uniform widths.
    """
    found = None if widths else load_search_result(workspace)
    if found is None:
        notes = [] if widths else [f"no search result in '{workspace}': building uniform widths "
                                   f"{', '.join(f'{w:g}' for w in DEFAULT_WIDTHS)} (run `dyncompile search` first "
                                   f"for searched, fine-tuned sub-nets)"]
        return WorkspaceSubnets(dg, uniform_subnets(dg, tuple(widths or DEFAULT_WIDTHS)), {}, {}, None, notes)
    result, state_dict, bn = found
    applied = apply_result(dg, result, state_dict)
    configs = {s.name: dict(s.config) for s in result.subnets}
    missing = [name for name in configs if name not in bn]
    if missing:
        raise ConfigError(f"the search result has no BatchNorm statistics for sub-net '{missing[0]}'; "
                          f"re-run `dyncompile search`")
    search = {"method": result.method, "full_accuracy": result.full_accuracy,
              "result_sha256": sha256_file(result_dir(workspace, result.method) / RESULT_FILE)}
    notes = [f"building the {len(configs)} sub-nets of the '{result.method}' search"]
    return WorkspaceSubnets(applied, configs, {name: bn[name] for name in configs},
                            {s.name: s.accuracy for s in result.subnets}, search, notes)


def workspace_facts(workspace: str | Path) -> dict:
    """What a deployable records about the workspace it was built from (to find it, and to notice a change)."""
    workspace = Path(workspace)
    return {"workspace": str(workspace.resolve()), "workspace_sha256": sha256_file(workspace / SPEC_FILE)}
