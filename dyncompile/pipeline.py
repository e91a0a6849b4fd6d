"""The conversion pipeline, readable top to bottom: each step is a pass you can also run alone.

    trace → couple → group            (analysis: DynGraph with channel sets and groups)
    rewrite                           (the slimmable model: Slim* layers + channel-group masks)
    extract(config)                   (any sub-net as a plain, smaller nn.Module)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dyncompile.ir import DynGraph
from dyncompile.passes.couple import couple
from dyncompile.passes.group import group
from dyncompile.passes.trace import trace

__all__ = ["analyse_model", "ANALYSIS_PASSES"]

ANALYSIS_PASSES: list[tuple[str, Callable[..., DynGraph]]] = [("couple", couple), ("group", group)]


def analyse_model(model: nn.Module, input_shape: tuple[int, ...], groups: int = 8, leaf_modules: tuple[str, ...] = (),
                  grouped_conv_mode: str = "auto", dump_after: str | None = None) -> DynGraph:
    """trace → couple → group. `dump_after`: print the DynGraph's sets after that pass (debugging)."""
    dg = trace(model, tuple(input_shape), tuple(leaf_modules))
    for name, run_pass in ANALYSIS_PASSES:
        dg = run_pass(dg, grouped_conv_mode) if name == "couple" else run_pass(dg, groups)
        if dump_after == name:
            for s in dg.sets:
                print(name, s.to_json())
    return dg
