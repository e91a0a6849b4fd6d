"""The plain functions of the search: floors, shrinking, chain filtering, budget selection, group ranking order,
reordering and the US-Nets widths. Fast: no training, no data."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dyncompile.errors import ConfigError, WorkspaceError
from dyncompile.ir import ChannelSet, DynGraph, reorder_groups, uniform_config
from dyncompile.pipeline import analyse_model
from dyncompile.search.progressive import floor_groups, shrink_candidates
from dyncompile.search.select import (PairedCounts, filter_chain, select_for_budgets, selectable_ceiling,
                                     under_ceiling, widths_for_budgets)
from dyncompile.search.rank import group_order, l1_scores
from dyncompile.search.result import SearchResult, apply_result
from dyncompile.search.usnet import uniform_widths
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
    # 0.6 is beaten by the smaller 0.4 (a fine-tune's effect); 0.4 only ties the smaller 0.3: a tie is no proof
    assert [e["step"] for e in kept] == [0, 1, 3, 4, 5]
    accs = [e["accuracy"] for e in kept[1:]]
    assert accs == sorted(accs, reverse=True)  # never less accurate when larger
    macs = [e["macs_fraction"] for e in kept]
    assert macs == sorted(macs, reverse=True)


def test_filter_chain_always_keeps_the_full_model_and_the_smallest():
    chain = [entry(1.0, 0.10, 0), entry(0.5, 0.95, 1), entry(0.25, 0.99, 2)]
    assert [e["step"] for e in filter_chain(chain)] == [0, 2]
    assert [e["step"] for e in filter_chain(chain[:1])] == [0]


# ── select_for_budgets ──

def chosen_steps(chain, budgets, tolerance=0.05, window="under", **kw):
    chosen, notes = select_for_budgets(chain, budgets, tolerance, window, **kw)
    return {b: e["step"] for b, e in chosen.items()}, notes


def test_select_for_budgets_around_is_the_papers_window():
    chain = [entry(1.0, 0.9, 0), entry(0.54, 0.80, 1), entry(0.50, 0.85, 2), entry(0.47, 0.85, 3),
             entry(0.27, 0.70, 4)]
    steps, notes = chosen_steps(chain, [0.25, 0.5, 1.0], window="around")
    assert steps == {1.0: 0, 0.5: 2, 0.25: 4} and not notes  # 0.85 twice: the larger one wins the tie


def test_a_budget_is_a_cap_by_default():
    chain = [entry(1.0, 0.9, 0), entry(0.54, 0.88, 1), entry(0.50, 0.80, 2), entry(0.47, 0.82, 3),
             entry(0.27, 0.70, 4), entry(0.22, 0.65, 5)]
    chosen, _ = select_for_budgets(chain, [0.25, 0.5], 0.05)
    assert {b: e["step"] for b, e in chosen.items()} == {0.25: 5, 0.5: 3}  # the best at or under each budget
    assert all(e["macs_fraction"] <= b for b, e in chosen.items())
    around, _ = chosen_steps(chain, [0.25, 0.5], window="around")
    assert around == {0.25: 4, 0.5: 1}  # 27% and 54%: over the budgets


def test_full_budget_is_the_full_model_even_when_a_smaller_candidate_scores_higher():
    chain = [entry(1.0, 0.90, 0), entry(0.97, 0.91, 1), entry(0.5, 0.85, 2)]
    assert chosen_steps(chain, [1.0, 0.5])[0] == {1.0: 0, 0.5: 2}


def test_falls_back_to_the_whole_chain_then_to_the_largest_under_the_budget():
    chain = [entry(1.0, 0.9, 0), entry(0.7, 0.8, 1), entry(0.48, 0.70, 2), entry(0.35, 0.75, 3), entry(0.2, 0.6, 4)]
    filtered = filter_chain(chain)
    assert 2 not in [e["step"] for e in filtered]  # the smaller 35% candidate beats it
    assert chosen_steps(chain, [0.5], filtered=filtered)[0] == {0.5: 2}  # the filter emptied the window, not the chain
    assert chosen_steps(chain, [0.4], filtered=filtered)[0] == {0.4: 3}
    assert chosen_steps(chain, [0.3], filtered=filtered)[0] == {0.3: 4}  # nothing in 25..30%: the largest under it


def test_every_budget_gets_its_own_subnet_while_one_is_left():
    """The demo's bug: the 50% window was empty and both 50% and 25% fell back to the same 24.9% network."""
    chain = [entry(1.0, 0.9, 0), entry(0.7, 0.8, 1), entry(0.249, 0.85, 2), entry(0.2, 0.6, 3)]
    steps, notes = chosen_steps(chain, [0.25, 0.5, 1.0], filtered=filter_chain(chain))
    assert steps == {0.25: 2, 0.5: 3, 1.0: 0} and not notes  # 20% is under 50% too: its own sub-net
    steps, notes = chosen_steps(chain[:3], [0.25, 0.5, 1.0])
    assert steps == {0.25: 2, 0.5: 2, 1.0: 0}  # nothing else under 50%: shared, and said
    assert notes == ["budgets 50% and 25% share one sub-net (24.9% MACs): the search has no other candidate "
                     "under 50%; it is built once"]


def test_select_for_budgets_refuses_a_budget_nothing_fits():
    chain = [entry(1.0, 0.9, 0), entry(0.6, 0.8, 1), entry(0.4, 0.7, 2)]
    with pytest.raises(ConfigError, match="no sub-net fits 10% .* smallest the search reached is 40.0%"):
        select_for_budgets(chain, [0.1, 0.5], 0.05)
    with pytest.raises(ConfigError, match="no sub-net fits 36%"):
        select_for_budgets(chain, [0.36], 0.05)  # a cap: 40% does not fit 36%
    assert chosen_steps(chain, [0.36], window="around")[0] == {0.36: 2}  # the paper's window does


def test_selectable_ceiling_is_the_top_of_the_largest_window_below_full_width():
    assert selectable_ceiling([0.1, 0.25, 0.5, 1.0], 0.05) == pytest.approx(0.5)
    assert selectable_ceiling([0.25, 0.5], 0.05, "around") == pytest.approx(0.55)
    assert selectable_ceiling([1.0], 0.05) == 0.0


@settings(max_examples=300, deadline=None)
@given(candidates=st.lists(st.tuples(st.integers(5, 99), st.floats(0.3, 0.95)), min_size=1, max_size=20,
                           unique_by=lambda c: c[0]),
       budgets=st.sets(st.sampled_from([0.1, 0.25, 0.4, 0.5, 0.75, 1.0]), min_size=1),
       window=st.sampled_from(["under", "around"]))
def test_candidates_above_every_window_change_no_choice(candidates, budgets, window):
    """The search re-measures and filters only candidates at or under `selectable_ceiling` (issue 14): keeping
    the others unfiltered, never comparing them, must choose exactly what filtering all would."""
    ordered = sorted(candidates, reverse=True)  # a chain: MACs (in percent) fall step by step
    chain = [entry(1.0, 0.97, 0)] + [entry(m / 100, a, i + 1) for i, (m, a) in enumerate(ordered)]
    budgets = sorted(budgets)
    ceiling = selectable_ceiling(budgets, 0.05, window)
    above = {e["step"] for e in chain} - {e["step"] for e in under_ceiling(chain, ceiling)}
    asked = []

    def plain_better(a, b):  # the plain rule, recording which candidates it is asked about
        asked.extend((a["step"], b["step"]))
        return a["accuracy"] > b["accuracy"]

    pruned = filter_chain(chain, plain_better, ceiling=ceiling)
    assert not above & set(asked)  # candidates above the ceiling need no (re-measured) accuracy
    try:
        expected = chosen_steps(chain, budgets, window=window, filtered=filter_chain(chain))
    except ConfigError:
        with pytest.raises(ConfigError):
            chosen_steps(chain, budgets, window=window, filtered=pruned)
        return
    assert chosen_steps(chain, budgets, window=window, filtered=pruned) == expected


# ── the paired noise test ──

def paired(steps, correct_rows):
    return PairedCounts.from_correct(steps, torch.tensor(correct_rows))


def test_paired_z_counts_only_the_images_two_candidates_disagree_on():
    # 100 images; a and b agree on 90; a gets 7 of the other 10 right, b 3: a is 4 points better
    a = [1] * 80 + [0] * 10 + [1] * 7 + [0] * 3
    b = [1] * 80 + [0] * 10 + [0] * 7 + [1] * 3
    counts = paired([0, 1], [a, b])
    n_ab, n_ba, n = 7, 3, 100
    diff = (n_ab - n_ba) / n
    expected = diff / math.sqrt(((n_ab + n_ba) / n - diff ** 2) / n)
    assert counts.z({"step": 0}, {"step": 1}) == pytest.approx(expected)
    assert counts.z({"step": 1}, {"step": 0}) == pytest.approx(-expected)
    assert counts.z({"step": 0}, {"step": 0}) == 0.0
    assert counts.better(1.0)({"step": 0}, {"step": 1}) and not counts.better(2.0)({"step": 0}, {"step": 1})


def test_within_the_noise_the_filter_keeps_and_the_window_prefers_the_larger_candidate():
    n = 400
    larger = [1] * 300 + [0] * 100  # 47% MACs: 300 right
    smaller = larger[:]  # 45% MACs: 2 images more, half a point: within the noise
    smaller[300] = smaller[301] = 1
    smallest = [1] * 200 + [0] * 200  # 20%: far worse
    chain = [entry(1.0, 1.0, 0), entry(0.47, 0.75, 1), entry(0.45, 0.755, 2), entry(0.2, 0.5, 3)]
    better = paired([0, 1, 2, 3], [[1] * n, larger, smaller, smallest]).better(2.0)
    assert [e["step"] for e in filter_chain(chain)] == [0, 2, 3]  # plain: the larger one is "dominated"
    kept = filter_chain(chain, better)
    assert [e["step"] for e in kept] == [0, 1, 2, 3]
    assert chosen_steps(chain, [0.5], filtered=kept, better=better)[0] == {0.5: 1}  # the split can't tell: larger
    assert chosen_steps(chain, [0.5])[0] == {0.5: 2}  # plain rule: the higher number wins
    much_better = paired([0, 1, 2, 3], [[1] * n, larger, smaller, [1] * n]).better(2.0)  # 20% now 100% right
    assert [e["step"] for e in filter_chain(chain[:3] + [entry(0.2, 1.0, 3)], much_better)] == [0, 3]


def test_widths_for_budgets_caps_and_distinct_widths():
    macs_of = {1.0: 1.0, 0.75: 0.58, 0.5: 0.30, 0.25: 0.10}
    chosen, notes = widths_for_budgets(macs_of, [0.1, 0.15, 0.35, 0.6, 1.0])
    assert chosen == {0.1: 0.25, 0.15: 0.25, 0.35: 0.5, 0.6: 0.75, 1.0: 1.0}
    assert notes == ["budgets 15% and 10% share one sub-net (10.0% MACs): the search has no other candidate under "
                     "15%; it is built once"]
    around, _ = widths_for_budgets(macs_of, [0.1, 0.15, 0.25, 0.5, 1.0], "around")
    assert around == {0.1: 0.25, 0.15: 0.25, 0.25: 0.5, 0.5: 0.75, 1.0: 1.0}  # closest, over or under
    assert widths_for_budgets({1.0: 0.75, 0.5: 0.25}, [0.5], "around")[0] == {0.5: 0.5}  # a tie: the smaller width


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
