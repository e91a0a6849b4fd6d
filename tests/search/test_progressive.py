"""The plain functions of the search: floors, shrinking, chain filtering, budget selection, group ranking order,
reordering and the US-Nets widths. Fast: no training, no data."""

from __future__ import annotations

import pytest
import torch

from dyncompile.errors import ConfigError, WorkspaceError
from dyncompile.ir import ChannelSet, DynGraph, reorder_groups, uniform_config
from dyncompile.pipeline import analyse_model
from dyncompile.search.progressive import filter_chain, floor_groups, select_for_budgets, shrink_candidates
from dyncompile.search.rank import group_order, l1_scores
from dyncompile.search.result import SearchResult, apply_result
from dyncompile.search.usnet import closest_widths, uniform_widths
from tests.search.tiny_models import tiny_residual_cnn


def channel_set(name: str, group_channels: list[int]) -> ChannelSet:
    classes = list(range(1, 1 + len(group_channels)))
    return ChannelSet(name=name, producers=[name], channels=sum(group_channels), classes=classes,
                      groups=[[c] for c in classes], group_channels=list(group_channels))


def graph_of(*sets: ChannelSet) -> DynGraph:
    return DynGraph(gm=None, input_shape=(1, 3, 8, 8), sets=list(sets))


# ── floor_groups ──

@pytest.mark.parametrize("group_channels, floor, expected", [
    ([2, 2, 2, 2], 0.25, 1),   # exactly one group holds 25%
    ([2, 2, 2, 2], 0.26, 2),   # just over: one more group
    ([2, 2, 2, 2], 0.5, 2),
    ([2, 2, 2, 2], 1.0, 4),
    ([1, 1, 1, 1, 1, 1, 1, 1], 0.25, 2),
    ([3, 3, 2], 0.5, 2),       # uneven groups: 3 < 4 ≤ 6
    ([5, 1, 1, 1], 0.25, 1),   # the first group alone is over the floor
    ([1, 1, 1, 5], 0.5, 4),    # small leading groups: the floor needs the big last one
    ([4], 0.01, 1),            # at least one group
])
def test_floor_groups_counts_channels_not_groups(group_channels, floor, expected):
    assert floor_groups(channel_set("s", group_channels), floor) == expected


# ── shrink_candidates ──

def test_shrink_candidates_one_group_smaller_per_set_and_respects_floors():
    dg = graph_of(channel_set("a", [2] * 4), channel_set("b", [2] * 8), channel_set("fixed", [8]))
    assert [s.name for s in dg.free_sets] == ["a", "b"]  # a one-group set is not free
    full = {"a": 4, "b": 8}
    assert shrink_candidates(dg, full, 0.25) == [("a", {"a": 3, "b": 8}), ("b", {"a": 4, "b": 7})]
    # 'a' at its floor (1 group of 4 = 25%): only 'b' may shrink; 'b' floor is 2 groups of 8
    assert shrink_candidates(dg, {"a": 1, "b": 3}, 0.25) == [("b", {"a": 1, "b": 2})]
    assert shrink_candidates(dg, {"a": 1, "b": 2}, 0.25) == []
    # a missing set counts as full width, and the input config is never modified
    cfg = {"b": 5}
    assert shrink_candidates(dg, cfg, 0.5) == [("a", {"b": 5, "a": 3}), ("b", {"b": 4})]
    assert cfg == {"b": 5}


def test_shrink_candidates_on_a_real_graph_are_nested_neighbours():
    dg = analyse_model(tiny_residual_cnn(), (1, 1, 28, 28), groups=4)
    full = {s.name: len(s.groups) for s in dg.free_sets}
    assert len(full) == 3
    config, seen = full, 0
    while True:
        candidates = shrink_candidates(dg, config, 0.25)
        if not candidates:
            break
        for set_name, cand in candidates:
            diff = {k: config[k] - cand[k] for k in config}
            assert diff == {k: int(k == set_name) for k in config}
        config = candidates[-1][1]
        seen += 1
    assert seen == 3 * 3 and all(v == 1 for v in config.values())  # 4 groups → floor of 1, per set


# ── filter_chain ──

def entry(macs: float, acc: float, step: int) -> dict:
    return {"macs_fraction": macs, "accuracy": acc, "step": step}


def test_filter_chain_keeps_the_monotone_chain():
    chain = [entry(1.0, 0.90, 0), entry(0.8, 0.88, 1), entry(0.6, 0.70, 2),  # 0.6 dominated by 0.4 (fine-tuned)
             entry(0.4, 0.80, 3), entry(0.3, 0.80, 4), entry(0.2, 0.60, 5)]
    kept = filter_chain(chain)
    # 0.6 is beaten by the smaller 0.4 (a fine-tune's effect); 0.4 only ties the smaller 0.3: both dropped
    assert [e["step"] for e in kept] == [0, 1, 4, 5]
    accs = [e["accuracy"] for e in kept[1:]]
    assert accs == sorted(accs, reverse=True) and len(set(accs)) == len(accs)  # strictly better when larger
    macs = [e["macs_fraction"] for e in kept]
    assert macs == sorted(macs, reverse=True)


def test_filter_chain_always_keeps_the_full_model_and_the_smallest():
    chain = [entry(1.0, 0.10, 0), entry(0.5, 0.95, 1), entry(0.25, 0.99, 2)]
    assert [e["step"] for e in filter_chain(chain)] == [0, 2]
    assert [e["step"] for e in filter_chain(chain[:1])] == [0]


# ── select_for_budgets ──

def test_select_for_budgets_best_accuracy_inside_the_window():
    chain = [entry(1.0, 0.9, 0), entry(0.54, 0.80, 1), entry(0.50, 0.85, 2), entry(0.47, 0.85, 3),
             entry(0.27, 0.70, 4)]
    chosen = select_for_budgets(chain, [0.25, 0.5, 1.0], 0.05)
    assert chosen[1.0]["step"] == 0
    assert chosen[0.5]["step"] == 3  # 0.85 twice: the smaller one wins the tie
    assert chosen[0.25]["step"] == 4


def test_select_for_budgets_falls_back_to_the_largest_under_the_budget():
    chain = [entry(1.0, 0.9, 0), entry(0.7, 0.8, 1), entry(0.35, 0.75, 2), entry(0.2, 0.6, 3)]
    chosen = select_for_budgets(chain, [0.5], 0.05)
    assert chosen[0.5]["step"] == 2  # nothing in 0.45..0.55: the largest ≤ 0.5


def test_select_for_budgets_refuses_a_budget_nothing_fits():
    chain = [entry(1.0, 0.9, 0), entry(0.6, 0.8, 1), entry(0.4, 0.7, 2)]
    with pytest.raises(ConfigError, match="no sub-net fits 10% .* smallest the search reached is 40.0%"):
        select_for_budgets(chain, [0.1, 0.5], 0.05)
    # inside the tolerance above the budget still fits
    assert select_for_budgets(chain, [0.36], 0.05)[0.36]["step"] == 2



def test_select_for_budgets_under_never_goes_over_the_budget():
    chain = [entry(1.0, 0.9, 0), entry(0.54, 0.88, 1), entry(0.50, 0.80, 2), entry(0.47, 0.82, 3),
             entry(0.27, 0.70, 4), entry(0.22, 0.65, 5)]
    around = select_for_budgets(chain, [0.25, 0.5], 0.05, "around")
    under = select_for_budgets(chain, [0.25, 0.5], 0.05, "under")
    assert around[0.5]["step"] == 1 and around[0.25]["step"] == 4  # 54% and 27%: over the budget
    assert under[0.5]["step"] == 3 and under[0.25]["step"] == 5  # the best at or under it
    assert all(e["macs_fraction"] <= b for b, e in under.items())

# ── group_order ──

SCORES = {"a": [0.3, 0.1, 0.5, 0.1], "b": [2.0, 1.0]}


def test_group_order_noise_tolerant_first_keeps_small_scales_first():
    # |a| small = noise hurts = important = kept longest (first); ties keep the original order
    assert group_order(SCORES, rank="noise", direction="tolerant-first") == {"a": [1, 3, 0, 2], "b": [1, 0]}


def test_group_order_noise_sensitive_first_reverses():
    assert group_order(SCORES, rank="noise", direction="sensitive-first") == {"a": [2, 0, 1, 3], "b": [0, 1]}


def test_group_order_l1_keeps_large_norms_first_and_reverses():
    assert group_order(SCORES, rank="l1", direction="tolerant-first") == {"a": [2, 0, 1, 3], "b": [0, 1]}
    assert group_order(SCORES, rank="l1", direction="sensitive-first") == {"a": [1, 3, 0, 2], "b": [1, 0]}


def test_group_order_is_a_permutation_per_set():
    g = torch.Generator().manual_seed(0)
    scores = {f"s{i}": torch.rand(n, generator=g).tolist() for i, n in enumerate((2, 3, 8, 16))}
    for rank in ("noise", "l1"):
        for direction in ("tolerant-first", "sensitive-first"):
            order = group_order(scores, rank=rank, direction=direction)
            assert {k: sorted(v) for k, v in order.items()} == {k: list(range(len(v))) for k, v in scores.items()}


def test_l1_scores_rank_the_group_with_zeroed_filters_last():
    dg = analyse_model(tiny_residual_cnn(), (1, 1, 28, 28), groups=4)
    s = dg.set_by_name("conv1")  # a set with a single producer
    conv = dg.gm.get_submodule("conv1")
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.weight[0:2] *= 0.01  # output channels 0, 1 = the first group (2 channels per group)
        conv.weight[6:8] *= 3.0   # the last group: largest norm
    scores = l1_scores(dg, dg.gm)
    assert len(scores["conv1"]) == len(s.groups) == 4
    order = group_order(scores, rank="l1", direction="tolerant-first")["conv1"]
    assert order[0] == 3 and order[-1] == 0


def test_reorder_groups_puts_groups_in_the_order_and_refuses_a_wrong_one():
    dg = graph_of(channel_set("a", [3, 1, 2]), channel_set("b", [1, 1]))
    reorder_groups(dg, {"a": [2, 0, 1]})
    a, b = dg.sets
    assert a.groups == [[3], [1], [2]] and a.group_channels == [2, 3, 1]
    assert b.groups == [[1], [2]]  # not named: unchanged
    for wrong in ({"a": [0, 1]}, {"a": [0, 0, 1]}, {"b": [1, 0], "a": [0, 1, 3]}):
        with pytest.raises(ValueError, match="is not an order"):
            reorder_groups(dg, wrong)
        assert a.groups == [[3], [1], [2]] and b.groups == [[1], [2]]  # nothing changed


def test_apply_result_refuses_a_wrong_order_in_one_line():
    dg = graph_of(channel_set("a", [1, 1]))
    result = SearchResult(method="progressive", subnets=[], group_order={"a": [1, 1]})
    with pytest.raises(WorkspaceError, match="orders channel groups wrongly .*re-run `dyncompile search`"):
        apply_result(dg, result)


# ── US-Nets widths ──

def test_uniform_widths_round_to_groups_and_stop_at_the_minimum():
    dg = graph_of(channel_set("a", [2] * 8), channel_set("b", [4] * 2), channel_set("c", [1] * 4))
    widths = uniform_widths(dg, 0.25)
    assert widths == [k / 8 for k in range(8, 1, -1)]
    configs = [uniform_config(dg, w) for w in widths]
    assert len({tuple(sorted(c.items())) for c in configs}) == len(configs)  # distinct sub-nets
    assert [c["a"] for c in configs] == list(range(8, 1, -1))
    assert [c["b"] for c in configs] == [2, 2, 2, 2, 1, 1, 1]
    # nested: every set's groups shrink monotonically with the width
    for bigger, smaller in zip(configs, configs[1:]):
        assert all(smaller[k] <= bigger[k] for k in bigger)
    assert uniform_widths(dg, 0.5) == [k / 8 for k in range(8, 3, -1)]
    assert uniform_widths(dg, 1.0) == [1.0]


def test_closest_widths_pick_the_nearest_macs_and_the_smaller_on_ties():
    macs_of = {1.0: 1.0, 0.75: 0.58, 0.5: 0.30, 0.25: 0.10}
    chosen = closest_widths(macs_of, [0.1, 0.15, 0.25, 0.5, 1.0])
    assert chosen == {0.1: 0.25, 0.15: 0.25, 0.25: 0.5, 0.5: 0.75, 1.0: 1.0}
    assert closest_widths({1.0: 0.75, 0.5: 0.25}, [0.5]) == {0.5: 0.5}  # 0.25 either way: the smaller width
