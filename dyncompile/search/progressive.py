"""The progressive sub-network search (Yang, He, Cao & Fan, arXiv 2009.05681), as phases of a `SearchRun`.

1. rank      order each set's channel groups (noise or L1, see `rank.py`); groups are then in that order, so
             every sub-net keeps a prefix of each set and the whole chain is nested by construction.
2. search    shrink from the full model: each step tries dropping the next group of every set not at its floor,
             scores each candidate on the held-out search split (BN on batch statistics), commits the best.
             Every committed step is a candidate sub-net (`greedy="lazy"`, the default, re-scores only the
             sets whose last score says they might win; "exhaustive" scores every set: `greedy.py`). Below
             the fine-tuning threshold, the current sub-net is fine-tuned jointly with the larger ones until it
             is back over it (or the epoch cap).
3. select    re-measure every candidate a budget can choose, and every smaller one, with the current weights
             (`remeasure_chain`), drop candidates a smaller one beats beyond the split's noise; per budget keep
             the largest of the most accurate ones at or under it (`budget_window="around"`: within ± tolerance,
             the paper's), each budget its own.
4. joint     multi-sub-net training: largest on labels, smallest and two more sub-nets distilled from it
             (`joint_pool`: drawn from the chosen sub-nets, the default, or from the whole filtered chain).
5. calibrate BN statistics per chosen sub-net, then the test split.

`shrink_candidates` and `floor_groups` are plain functions (tested alone); the rules that pick a candidate per
budget (caps, one sub-net per budget, the paired noise test) live in `select.py`, shared with US-Nets.
"""

from __future__ import annotations

import torch

from dyncompile.errors import ConfigError
from dyncompile.ir import ChannelSet, DynGraph, SubnetConfig
from dyncompile.search.greedy import pick_exhaustive, pick_lazy
from dyncompile.search.methods import SearchMethod, register_search_method
from dyncompile.search.result import SearchResult, subnet_name
from dyncompile.search.run import SearchOptions, SearchRun
from dyncompile.search.select import (PairedCounts, filter_chain, select_for_budgets, selectable_ceiling,
                                     under_ceiling)
from dyncompile.search.subnets import full_config

__all__ = ["floor_groups", "shrink_candidates", "finetune_check_every", "run_progressive"]


def floor_groups(s: ChannelSet, floor: float) -> int:
    """Fewest leading groups that still hold `floor` of the set's channels (at least one)."""
    need = floor * sum(s.group_channels)
    total = 0
    for k, channels in enumerate(s.group_channels, 1):
        total += channels
        if total >= need - 1e-9:
            return k
    return len(s.groups)


def shrink_candidates(dg: DynGraph, config: SubnetConfig, floor: float) -> list[tuple[str, SubnetConfig]]:
    """Every one-group-smaller neighbour of `config` (set name, config), sets at their floor excluded."""
    out = []
    for s in dg.free_sets:
        kept = config.get(s.name, len(s.groups))
        if kept - 1 >= floor_groups(s, floor):
            out.append((s.name, {**config, s.name: kept - 1}))
    return out


def _check_budgets_reachable(run: SearchRun) -> None:
    o = run.options
    floor_config = {s.name: floor_groups(s, o.floor) for s in run.dg.free_sets}
    smallest = run.macs(floor_config) / run.full_macs
    slack = o.tolerance if o.budget_window == "around" else 0.0  # a cap allows nothing over the budget
    too_small = [b for b in o.subnets if b + slack < smallest - 1e-9]
    if too_small:
        raise ConfigError(f"--subnets {min(too_small):g} cannot be met: with every set at its floor "
                          f"({o.floor:.0%} of its channels) the model keeps {smallest:.1%} of its MACs; "
                          f"lower --floor or ask for a larger budget")


def _search(run: SearchRun) -> None:
    o, v = run.options, run.state["values"]
    if not run.phase("search"):
        return
    s = v.setdefault("search", None)
    if s is None:
        with run.timed("greedy"):
            full_acc = run.accuracy(None, "search", bn="batch")
        threshold = full_acc - o.finetune_threshold if o.threshold_mode == "drop" else o.finetune_threshold
        s = v["search"] = {"config": full_config(run.dg), "step": 0, "threshold": threshold, "finetune": None,
                           "chain": [{"step": 0, "config": full_config(run.dg), "macs_fraction": 1.0,
                                      "accuracy": full_acc, "dropped": None}]}
        run.event("search-start", search_accuracy=full_acc, threshold=threshold)
    smallest_budget = min(o.subnets)
    spe = run.steps_per_epoch()
    while True:
        if s["finetune"] is not None:
            _finetune(run, s, spe)
            continue
        current = s["config"]
        if run.macs(current) / run.full_macs < smallest_budget - 1e-9:
            break
        candidates = shrink_candidates(run.dg, current, o.floor)
        if not candidates:
            break
        step = s["step"] + 1

        def score(set_name: str, cand: SubnetConfig) -> tuple[float, float]:
            acc = run.accuracy(cand, "search", bn="batch")
            macs = run.macs(cand) / run.full_macs
            run.event("eval", split="search", step=step, dropped=set_name, macs_fraction=round(macs, 4), accuracy=acc)
            run.progress("search", step=step, candidate=set_name, macs=macs, accuracy=acc)
            return acc, macs

        with run.timed("greedy"):
            if o.greedy == "lazy":
                picked, evaluations = pick_lazy(candidates, score, s.setdefault("bounds", {}), step,
                                                s["chain"][-1]["accuracy"], o.lazy_scores)
            else:
                picked, evaluations = pick_exhaustive(candidates, score)
        acc, neg_macs, set_name, best = picked
        s["step"] += 1
        s["config"] = best
        s["chain"].append({"step": s["step"], "config": best, "macs_fraction": -neg_macs, "accuracy": acc,
                           "dropped": set_name})
        run.event("step", step=s["step"], dropped=set_name, macs_fraction=round(-neg_macs, 4), accuracy=acc,
                  candidates=len(candidates), scored=evaluations)
        if acc < s["threshold"]:
            s["finetune"] = {"step": s["step"], "before": acc}
        run.save()
    run.finish_phase("search")


def finetune_check_every(o: SearchOptions) -> int:
    """Training steps between a fine-tune's accuracy checks. Most fine-tunes are back over the threshold within a
    few steps, and a check (one pass over the search split) costs about a tenth of the steps between two checks,
    so checks come every `finetune_check_images` images: a fixed count, not a fraction of the epoch, so a larger
    training set does not make every fine-tune longer (issue 14)."""
    return max(1, round(o.finetune_check_images / o.batch_size))


def _finetune(run: SearchRun, s: dict, spe: int) -> None:
    """Fine-tune the current sub-net jointly with the larger chain members until it is over the threshold."""
    o = run.options
    current = s["config"]
    larger = [e["config"] for e in s["chain"][1:-1]]
    info = s["finetune"]
    passed = {"acc": None}

    def configs_for(step, gen):
        configs = [None, current]
        if larger:
            configs.append(larger[int(torch.randint(len(larger), (), generator=gen))])
        return configs

    def check(step):
        passed["acc"] = run.accuracy(current, "search", bn="batch")
        run.event("eval", split="search", step=s["step"], finetune_step=step, accuracy=passed["acc"])
        return passed["acc"] >= s["threshold"]

    with run.timed("finetune"):
        steps = run.train(f"finetune-{info['step']}", o.finetune_epochs, configs_for, lr=o.finetune_lr, check=check,
                          check_every=finetune_check_every(o), label=f"fine-tune step {info['step']}")
        after = run.accuracy(current, "search", bn="batch")
    s["chain"][-1]["accuracy_before_finetune"] = info["before"]
    s["chain"][-1]["accuracy"] = after
    s["chain"][-1]["finetune_steps"] = steps
    run.event("finetune", step=info["step"], before=info["before"], after=after, steps=steps,
              epochs=round(steps / spe, 3), threshold=s["threshold"], reached=after >= s["threshold"])
    s["finetune"] = None
    run.save()


def _select(run: SearchRun) -> None:
    o, v = run.options, run.state["values"]
    if not run.phase("select"):
        return
    chain = v["search"]["chain"]
    better = None
    # Candidates above every budget's window can be neither chosen nor filter one that can (`selectable_ceiling`):
    # they are not re-measured and not filtered, unless joint training draws from the whole filtered chain.
    ceiling = 1.0 if o.joint_pool == "chain" else selectable_ceiling(o.subnets, o.tolerance, o.budget_window)
    considered = under_ceiling(chain, ceiling)
    if o.remeasure_chain:
        # A candidate's accuracy was measured when it was committed; every later fine-tune changed the shared
        # weights. Filtering on those stale numbers drops larger candidates as "dominated" by smaller,
        # fine-tuned ones and empties the windows of the larger budgets. Measure them again, now, keeping
        # which images each gets right: the paired test needs them.
        rows = []
        with run.timed("remeasure"):
            for entry in considered:
                entry.setdefault("accuracy_at_step", entry["accuracy"])
                correct = run.correct(entry["config"] if entry["step"] else None, "search", bn="batch")
                entry["accuracy"] = run.accuracy_of(correct)
                rows.append(correct)
        counts = PairedCounts.from_correct([e["step"] for e in considered], torch.stack(rows))
        better = counts.reduced(run.procs.sum, len(run.splits.search)).better(o.select_z)
        measured = {e["step"] for e in considered}
        run.event("remeasure", accuracies=[round(e["accuracy"], 4) for e in chain],
                  not_remeasured=[e["step"] for e in chain if e["step"] not in measured])
    rule = {} if better is None else {"better": better}
    filtered = filter_chain(chain, **rule, ceiling=ceiling)
    chosen, notes = select_for_budgets(chain, o.subnets, o.tolerance, o.budget_window, filtered=filtered, **rule)
    for text in notes:
        run.event("note", text=text)
    v["filtered_steps"] = [e["step"] for e in filtered]
    v["chosen"] = {str(b): e["step"] for b, e in chosen.items()}
    run.event("select", candidates=len(chain), kept=len(filtered),
              chosen={f"{b:g}": {"step": e["step"], "macs_fraction": round(e["macs_fraction"], 4),
                                 "search_accuracy": e["accuracy"]} for b, e in chosen.items()})
    run.finish_phase("select")


def _joint_train(run: SearchRun) -> None:
    o, v = run.options, run.state["values"]
    if not run.phase("joint-train") or o.epochs <= 0:
        return
    by_step = {e["step"]: e for e in v["search"]["chain"]}
    filtered = [by_step[i]["config"] for i in v["filtered_steps"]]
    smallest, middle = filtered[-1], filtered[1:-1] or filtered[-1:]
    if o.joint_pool == "chosen":
        # Train what ships: the chosen sub-nets (largest first); the chain only when there is no middle one.
        steps = sorted({i for i in v["chosen"].values() if i != 0})
        if steps:
            larger_in_chain = [by_step[i]["config"] for i in v["filtered_steps"] if 0 < i < steps[-1]]
            smallest = by_step[steps[-1]]["config"]
            middle = [by_step[i]["config"] for i in steps[:-1]] or larger_in_chain or [smallest]

    def configs_for(step, gen):
        picks = torch.randint(len(middle), (2,), generator=gen).tolist()
        return [None, smallest, *(middle[i] for i in picks)]

    with run.timed("joint-train"):
        run.train("joint", o.epochs, configs_for, lr=o.lr, label="joint training")
    run.event("joint-train", epochs=o.epochs, subnets=len(filtered))
    run.finish_phase("joint-train")


def run_progressive(run: SearchRun) -> SearchResult:
    o = run.options
    _check_budgets_reachable(run)
    run.measure_given_model()
    run.rank_groups()
    _search(run)
    _select(run)
    _joint_train(run)
    v = run.state["values"]
    by_step = {e["step"]: e for e in v["search"]["chain"]}
    first_budget: dict[int, float] = {}  # a sub-net two budgets share is recorded once, under the smaller's name
    for b in sorted(o.subnets):
        first_budget.setdefault(v["chosen"][str(b)], b)
    with run.timed("calibrate-test"):
        records = [run.record(subnet_name(b), by_step[step]["config"], b, search_accuracy=by_step[step]["accuracy"])
                   for step, b in sorted(first_budget.items(), key=lambda sb: -sb[1])]
    return run.finish(records, v["group_order"])


register_search_method(SearchMethod("progressive", "the progressive sub-network search (Yang et al. 2020)",
                                    run_progressive, default_rank="noise"))
