"""Universally Slimmable Networks (Yu & Huang, ICCV 2019): the baseline the progressive search must beat.

Published recipe on the shared weights: uniform width w ∈ [min_width, 1] with every set rounded to whole
channel groups (`uniform_config`), the sandwich rule (largest, smallest and `sandwich_random` uniformly drawn
widths per step), in-place distillation (soft cross-entropy against the detached largest), then per-width
cumulative BN calibration. For each requested MACs budget it keeps the uniform width whose MACs come closest.
Same data, epochs, optimizer and seed as the progressive run; no ranking (groups stay in convert's order).
"""

from __future__ import annotations

import torch

from dyncompile.ir import DynGraph, SubnetConfig, uniform_config
from dyncompile.search.methods import SearchMethod, register_search_method
from dyncompile.search.result import SearchResult, subnet_name
from dyncompile.search.run import SearchRun

__all__ = ["uniform_widths", "closest_widths", "run_usnet"]


def uniform_widths(dg: DynGraph, min_width: float) -> list[float]:
    """The distinct uniform widths in [min_width, 1] once rounded to whole groups (largest first)."""
    groups = max(len(s.groups) for s in dg.free_sets)
    widths, seen = [], set()
    for k in range(groups, 0, -1):
        w = k / groups
        if w < min_width - 1e-9:
            break
        key = tuple(sorted(uniform_config(dg, w).items()))
        if key not in seen:
            seen.add(key)
            widths.append(w)
    return widths


def closest_widths(macs_of: dict[float, float], budgets: list[float]) -> dict[float, float]:
    """Per budget, the width whose MACs fraction is closest (ties: the smaller width)."""
    return {b: min(macs_of, key=lambda w: (abs(macs_of[w] - b), w)) for b in budgets}


def run_usnet(run: SearchRun) -> SearchResult:
    o, dg = run.options, run.dg
    run.measure_given_model()
    if run.phase("usnet-train") and o.epochs > 0:
        smallest = uniform_config(dg, o.min_width)

        def configs_for(step: int, gen: torch.Generator) -> list[SubnetConfig | None]:
            widths = (o.min_width + (1 - o.min_width) * torch.rand(o.sandwich_random, generator=gen)).tolist()
            return [None, smallest, *(uniform_config(dg, w) for w in widths)]

        steps = run.train("usnet", o.epochs, configs_for, lr=o.lr, label="US-Nets sandwich training")
        run.event("usnet-train", epochs=o.epochs, steps=steps)
        run.finish_phase("usnet-train")
    macs_of = {w: run.macs(uniform_config(dg, w)) / run.full_macs for w in uniform_widths(dg, o.min_width)}
    chosen = closest_widths(macs_of, sorted(o.subnets))
    run.event("select", widths={f"{b:g}": {"width": w, "macs_fraction": round(macs_of[w], 4)} for b, w in chosen.items()})
    records = [run.record(subnet_name(b), uniform_config(dg, chosen[b]), b) for b in sorted(o.subnets, reverse=True)]
    identity = {s.name: list(range(len(s.groups))) for s in dg.free_sets}
    return run.finish(records, identity)


register_search_method(SearchMethod("usnet", "the US-Nets baseline (Yu & Huang 2019)", run_usnet))
