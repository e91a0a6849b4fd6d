"""The greedy step pickers: exhaustive scores every set; lazy keeps stale bounds and re-scores few, yet picks the
same sets when scores move the way bounds assume, and its cost per step does not grow with the number of sets."""

from __future__ import annotations

import random

from dyncompile.search.greedy import pick_exhaustive, pick_lazy


def synthetic_chain(sets: int, steps: int, mode: str, seed: int = 0, drift: float = 0.0):
    """Run `steps` greedy steps on `sets` sets whose drop costs grow as a set shrinks (each drop of set i costs
    cost[i] * (1 + drops of i)); `drift`: random per-step noise on every score. Returns (picks, evaluations)."""
    rng = random.Random(seed)
    cost = [rng.uniform(0.1, 1.0) for _ in range(sets)]
    drops = [0] * sets
    accuracy, bounds, picks, evaluations = 100.0, {}, [], 0
    for step in range(1, steps + 1):
        noise = [rng.uniform(-drift, drift) for _ in range(sets)]
        candidates = [(f"s{i}", {"set": i}) for i in range(sets) if drops[i] < 6]

        def score(name, config):
            i = config["set"]
            return accuracy - cost[i] * (1 + drops[i]) + noise[i], 1.0 - sum(drops) / 1000

        if mode == "lazy":
            (acc, _, name, config), spent = pick_lazy(candidates, score, bounds, step, accuracy, max_scores=4)
        else:
            (acc, _, name, config), spent = pick_exhaustive(candidates, score)
        drops[config["set"]] += 1
        accuracy, evaluations = acc, evaluations + spent
        picks.append(name)
    return picks, evaluations


def test_first_lazy_step_scores_every_set_and_picks_like_exhaustive():
    candidates = [(f"s{i}", {"i": i}) for i in range(5)]
    accuracy = {0: 0.70, 1: 0.90, 2: 0.80, 3: 0.90, 4: 0.10}
    score = lambda name, c: (accuracy[c["i"]], 0.5 + c["i"] / 100)  # noqa: E731  (ties: fewer MACs win)
    bounds = {}
    lazy, spent = pick_lazy(candidates, score, bounds, 1, 1.0, max_scores=4)
    assert spent == 5 and lazy == pick_exhaustive(candidates, score)[0]
    assert lazy[2] == "s1" and bounds["s4"] == [accuracy[4] - 1.0, 1]


def test_lazy_rescores_the_best_bound_until_it_is_fresh():
    candidates = [("a", {}), ("b", {}), ("c", {})]
    bounds = {"a": [-0.01, 1], "b": [-0.02, 2], "c": [-0.30, 2]}
    now = {"a": 0.50, "b": 0.97, "c": 0.60}  # a's drop hurts more now; b is the true best
    scored = []

    def score(name, config):
        scored.append(name)
        return now[name], 0.5

    (acc, _, name, _), spent = pick_lazy(candidates, score, bounds, 3, 1.0, max_scores=4)
    # a: the oldest bound, refreshed first (-0.5); then b holds the best bound, is re-scored (-0.03) and wins
    assert scored == ["a", "b"] and name == "b" and spent == 2
    assert bounds["a"] == [-0.5, 3] and bounds["b"][1] == 3 and bounds["c"] == [-0.30, 2]


def test_lazy_spends_at_most_max_scores_beyond_new_and_oldest():
    candidates = [(f"s{i}", {"i": i}) for i in range(10)]
    bounds = {f"s{i}": [0.0, 1] for i in range(10)}  # every bound optimistic: each re-score disappoints
    _, spent = pick_lazy(candidates, lambda n, c: (0.0, 0.5), bounds, 2, 1.0, max_scores=3)
    assert spent == 1 + 3


def test_lazy_follows_exhaustive_when_costs_only_grow():
    exhaustive, _ = synthetic_chain(12, 50, "exhaustive")
    lazy, _ = synthetic_chain(12, 50, "lazy")
    assert lazy == exhaustive


def test_lazy_cost_per_step_does_not_grow_with_the_sets():
    per_step = {}
    for sets in (13, 50, 100):
        steps = 3 * sets
        _, exhaustive = synthetic_chain(sets, steps, "exhaustive", drift=0.05)
        _, lazy = synthetic_chain(sets, steps, "lazy", drift=0.05)
        assert lazy < exhaustive / 2
        per_step[sets] = (lazy - sets) / steps  # the first step scores every set
    assert per_step[100] <= 6 and per_step[13] <= 6, per_step  # oldest + at most 4 re-scores + the winner
