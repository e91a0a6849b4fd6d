"""Universally Slimmable Networks (Yu & Huang, ICCV 2019): the baseline the progressive search must beat.

Published recipe on the shared weights: uniform width w ∈ [min_width, 1] with every set rounded to whole
channel groups (`uniform_config`), the sandwich rule (largest, smallest and `sandwich_random` uniformly drawn
widths per step), in-place distillation (soft cross-entropy against the detached largest), then per-width
cumulative BN calibration. For each requested MACs budget it keeps the widest uniform width at or under it (a
cap, as for every method: `select.widths_for_budgets`; `budget_window="around"`: the closest width).
Same data, epochs, optimizer and seed as the progressive run. No ranking by default (groups stay in convert's
order, as published); `--rank l1|noise` ranks them first, the same phase the progressive search runs, so the
baseline can start from the same channel order (the control a fair comparison needs, see docs/search.md).
"""

from __future__ import annotations

import torch

from dyncompile.ir import DynGraph, SubnetConfig, uniform_config
from dyncompile.search.methods import SearchMethod, register_search_method
from dyncompile.search.result import SearchResult, subnet_name
from dyncompile.search.run import SearchRun
from dyncompile.search.select import widths_for_budgets

__all__ = ["uniform_widths", "run_usnet"]


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


def run_usnet(run: SearchRun) -> SearchResult:
    o, dg = run.options, run.dg
    run.measure_given_model()
    run.rank_groups()
    if run.phase("usnet-train") and o.epochs > 0:
        smallest = uniform_config(dg, o.min_width)

        def configs_for(step: int, gen: torch.Generator) -> list[SubnetConfig | None]:
            widths = (o.min_width + (1 - o.min_width) * torch.rand(o.sandwich_random, generator=gen)).tolist()
            return [None, smallest, *(uniform_config(dg, w) for w in widths)]

        with run.timed("usnet-train"):
            steps = run.train("usnet", o.epochs, configs_for, lr=o.lr, label="US-Nets sandwich training")
        run.event("usnet-train", epochs=o.epochs, steps=steps)
        run.finish_phase("usnet-train")
    macs_of = {w: run.macs(uniform_config(dg, w)) / run.full_macs for w in uniform_widths(dg, o.min_width)}
    chosen, notes = widths_for_budgets(macs_of, o.subnets, o.budget_window)
    for text in notes:
        run.event("note", text=text)
    run.event("select", widths={f"{b:g}": {"width": w, "macs_fraction": round(macs_of[w], 4)} for b, w in chosen.items()})
    first_budget = {}  # a width two budgets share is recorded once, under the smaller budget's name
    for b in sorted(chosen):
        first_budget.setdefault(chosen[b], b)
    with run.timed("calibrate-test"):
        records = [run.record(subnet_name(b), uniform_config(dg, w), b)
                   for w, b in sorted(first_budget.items(), key=lambda wb: -wb[1])]
    return run.finish(records, run.state["values"]["group_order"])


register_search_method(SearchMethod("usnet", "the US-Nets baseline (Yu & Huang 2019)", run_usnet))
