"""The conversion pipeline, readable top to bottom: each step is a pass you can also run alone.

    trace → lift → couple → group     (analysis: DynGraph with channel sets and groups)
    rewrite                           (the slimmable model: Slim* layers + channel-group masks)
    extract(config)                   (any sub-net as a plain, smaller nn.Module)

`analyse_model` runs the analysis passes in `ANALYSIS_PASSES` order; `dyncompile convert` and the tests call it,
so the order lives here only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from dyncompile.ir import DynGraph
from dyncompile.passes.couple import couple
from dyncompile.passes.functional import lift_functional_layers
from dyncompile.passes.group import group
from dyncompile.passes.trace import trace

__all__ = ["AnalysisOptions", "analyse_model", "ANALYSIS_PASSES"]


@dataclass(frozen=True)
class AnalysisOptions:
    groups: int = 8  # channel groups per free channel set
    grouped_conv_mode: str = "auto"  # see passes.couple.GROUPED_CONV_MODES
    group_multiple: int = 1  # each group a multiple of this many channels (passes.group)


# (name, what it does in words for progress lines, the pass); every pass takes (DynGraph, AnalysisOptions)
ANALYSIS_PASSES: list[tuple[str, str, Callable[[DynGraph, AnalysisOptions], DynGraph]]] = [
    ("lift", "lifting functional layers", lambda dg, o: lift_functional_layers(dg)),
    ("couple", "analysing channel couplings", lambda dg, o: couple(dg, o.grouped_conv_mode)),
    ("group", "grouping channels", lambda dg, o: group(dg, o.groups, o.group_multiple)),
]


def analyse_model(model: nn.Module, input_shape: tuple[int, ...], groups: int = 8, leaf_modules: tuple[str, ...] = (),
                  grouped_conv_mode: str = "auto", dump_after: str | None = None,
                  step: Callable[[str], None] = lambda _: None, group_multiple: int = 1) -> DynGraph:
    """trace → lift → couple → group. `dump_after`: print the DynGraph's sets after that pass (debugging); `step` is told
    what runs next (progress)."""
    options = AnalysisOptions(groups, grouped_conv_mode, group_multiple)
    step("tracing")
    dg = trace(model, tuple(input_shape), tuple(leaf_modules))
    for name, doing, run_pass in ANALYSIS_PASSES:
        step(doing)
        dg = run_pass(dg, options)
        if dump_after == name:
            for s in dg.sets:
                print(name, s.to_json())
    return dg
