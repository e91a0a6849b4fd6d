"""One greedy step of the progressive search: which one-group-smaller neighbour of the current sub-net to commit.

- ``exhaustive`` (the paper): score every neighbour on the search split. A step costs one evaluation per set not
  at its floor, and the number of steps grows with the sets too, so the whole search is quadratic in the number
  of channel sets.
- ``lazy`` (Minoux's lazy greedy, the default): every set keeps a *bound*, the accuracy change (neighbour minus
  current) it showed when it was last scored. Dropping one set's group rarely makes another set's drop hurt less,
  so an old bound is an optimistic estimate. A step scores the sets without a bound and the one with the oldest bound
  (so every bound is refreshed within about one step per set), then re-scores the set with the best bound until
  that set is one scored in this step, or `max_scores` more have been scored. A step then costs a few
  evaluations, whatever the number of sets.

Bounds live in the search state (`bounds`: set -> [change, step]), so a resumed search takes the same steps.
"""

from __future__ import annotations

from collections.abc import Callable

from dyncompile.ir import SubnetConfig

__all__ = ["GREEDY_MODES", "Scored", "pick_exhaustive", "pick_lazy"]

GREEDY_MODES = ("exhaustive", "lazy")

Scored = tuple[float, float, str, SubnetConfig]  # (accuracy, -MACs fraction, set dropped, config)
Scorer = Callable[[str, SubnetConfig], tuple[float, float]]  # (set, config) -> (accuracy, MACs fraction)


def _best(scored: list[Scored]) -> Scored:
    """Most accurate; among equals, the fewest MACs."""
    return max(scored, key=lambda t: (t[0], t[1]))


def pick_exhaustive(candidates: list[tuple[str, SubnetConfig]], score: Scorer) -> tuple[Scored, int]:
    """(the best neighbour, evaluations spent): every neighbour scored."""
    scored = []
    for name, config in candidates:
        accuracy, macs = score(name, config)
        scored.append((accuracy, -macs, name, config))
    return _best(scored), len(scored)


def pick_lazy(candidates: list[tuple[str, SubnetConfig]], score: Scorer, bounds: dict[str, list],
              step: int, current_accuracy: float, max_scores: int) -> tuple[Scored, int]:
    """(the best neighbour found, evaluations spent); updates `bounds` in place (see the module docstring)."""
    config_of = dict(candidates)
    order = [name for name, _ in candidates]
    position = {name: i for i, name in enumerate(order)}  # ties go to the set listed first
    fresh: dict[str, Scored] = {}

    def take(name: str) -> None:
        accuracy, macs = score(name, config_of[name])
        fresh[name] = (accuracy, -macs, name, config_of[name])
        bounds[name] = [accuracy - current_accuracy, step]

    for name in order:
        if name not in bounds:
            take(name)
    stale = [name for name in order if name not in fresh]
    if stale:
        take(min(stale, key=lambda n: (bounds[n][1], position[n])))
    for _ in range(max_scores):
        top = max(order, key=lambda n: (bounds[n][0], -position[n]))
        if top in fresh:
            break
        take(top)
    return _best(list(fresh.values())), len(fresh)
