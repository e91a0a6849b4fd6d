"""Which candidate ships for each requested MACs budget: one home for every method's selection rules.

A budget is a promise. By default (`window="under"`) a sub-net never has more MACs than asked; `1.0` is the
full model itself; and every budget gets its own sub-net while a candidate under it is left, so asking for
three operating points gives three networks. Two budgets share one only when nothing else fits under the
larger; `select_for_budgets` then says so in its notes (the result keeps one sub-net, built once).

Accuracies on a search split of a few hundred images move by one to two points between splits, so the
progressive search compares candidates with a *paired* test (`PairedCounts`): both candidates ran on the
same images, and the difference of their accuracies has the standard error of the images they disagree on.
A candidate counts as worse only when it is `z` standard errors worse. Within that noise, the larger
candidate is preferred (it is the safer pick: more capacity, and the measurement cannot tell them apart).
docs/search.md gives the measurement behind the default `z`.

    chosen, notes = select_for_budgets(chain, [0.25, 0.5, 1.0], tolerance=0.05)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dyncompile.errors import ConfigError

__all__ = ["BUDGET_WINDOWS", "PairedCounts", "filter_chain", "select_for_budgets", "selectable_ceiling",
           "under_ceiling", "widths_for_budgets"]

BUDGET_WINDOWS = ("under", "around")  # a cap (the default), or the paper's budget ± tolerance
_EPS = 1e-9

# better(a, b): is candidate a more accurate than candidate b, beyond the measurement's noise?
Better = Callable[[dict, dict], bool]


def _plain_better(a: dict, b: dict) -> bool:
    return a["accuracy"] > b["accuracy"]


@dataclass(frozen=True)
class PairedCounts:
    """Per-image agreement of chain candidates on one split: `wins[i, j]` = images candidate i classifies
    right and candidate j wrong; `images` = split size. Indexed by the candidates' `step`."""

    wins: torch.Tensor
    images: int
    index: dict[int, int]  # chain step → row

    @classmethod
    def from_correct(cls, steps: Sequence[int], correct: torch.Tensor) -> "PairedCounts":
        """`correct`: (candidates × images) 0/1 matrix, one row per step (this process's shard of the split)."""
        c = correct.to(torch.float64)
        wins = c @ (1 - c).T
        return cls(wins, correct.shape[1], {s: i for i, s in enumerate(steps)})

    def reduced(self, reduce: Callable[[torch.Tensor], torch.Tensor], images: int) -> "PairedCounts":
        """Summed over processes (sharded data): `reduce` sums a tensor across ranks; `images` is the total."""
        return PairedCounts(reduce(self.wins.clone()), images, self.index)

    def z(self, a: dict, b: dict) -> float:
        """How many standard errors candidate a's accuracy is above candidate b's (paired, on the same images)."""
        i, j = self.index[a["step"]], self.index[b["step"]]
        n_ab, n_ba, n = float(self.wins[i, j]), float(self.wins[j, i]), self.images
        diff = (n_ab - n_ba) / n
        var = ((n_ab + n_ba) / n - diff * diff) / n
        if var <= 0:
            return 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return diff / math.sqrt(var)

    def better(self, z: float) -> Better:
        """The `Better` rule at `z` standard errors (z = 0: any difference counts, the plain comparison)."""
        if z <= 0:
            return _plain_better
        return lambda a, b: self.z(a, b) > z


def under_ceiling(chain: list[dict], ceiling: float) -> list[dict]:
    """The full model and the candidates at or under `ceiling` (see `selectable_ceiling`), in chain order."""
    return [e for e in chain if e["step"] == 0 or e["macs_fraction"] <= ceiling + _EPS]


def filter_chain(chain: list[dict], better: Better = _plain_better, *, ceiling: float = 1.0) -> list[dict]:
    """Drop every candidate that some smaller candidate is `better` than: larger must mean more accurate.

    `chain` is in search order (largest first), each with "macs_fraction" and "accuracy"; the first entry (the
    full model, the distillation teacher) always stays. With the plain rule (any difference counts) the kept
    chain is strictly monotone; with a noise-aware rule a candidate survives a smaller one that is better only
    within the noise. Candidates above `ceiling` stay unfiltered and `better` is never asked about them: no
    budget can choose them (`selectable_ceiling`), so they need no fresh accuracy."""
    rest = sorted(chain[1:], key=lambda e: e["macs_fraction"])
    kept = [e for k, e in enumerate(rest)
            if e["macs_fraction"] > ceiling + _EPS or not any(better(smaller, e) for smaller in rest[:k])]
    return [chain[0], *sorted(kept, key=lambda e: -e["macs_fraction"])]


def _window(budget: float, tolerance: float, window: str) -> tuple[float, float]:
    high = budget + (tolerance if window == "around" else 0.0)
    return budget - tolerance - _EPS, high + _EPS


def _pick(entries: list[dict], better: Better) -> dict:
    """The largest candidate that no other one is `better` than (the most accurate one, within the noise)."""
    best = max(entries, key=lambda e: (e["accuracy"], e["macs_fraction"]))
    return max((e for e in entries if not better(best, e)), key=lambda e: e["macs_fraction"])


def selectable_ceiling(budgets: Sequence[float], tolerance: float, window: str = "under") -> float:
    """The largest MACs fraction a candidate can have and still matter to `select_for_budgets` (besides the full
    model): the top of the largest window below full width. A larger candidate is never chosen (every pick is in
    a window or under a budget), and `filter_chain` drops a candidate only for a *smaller* one, so it cannot
    filter one that can be chosen either. 0.0 when every budget is the full model."""
    return max((_window(b, tolerance, window)[1] for b in budgets if b < 1 - _EPS), default=0.0)


def select_for_budgets(chain: list[dict], budgets: Sequence[float], tolerance: float, window: str = "under",
                       *, filtered: list[dict] | None = None, better: Better = _plain_better
                       ) -> tuple[dict[float, dict], list[str]]:
    """Per budget, the candidate to ship, and notes (one line each) on anything a user should know.

    `chain`: every candidate of the search (largest first; `chain[0]` is the full model); `filtered`: the ones
    `filter_chain` kept (default: all). A budget ≥ 1 is the full model. Otherwise, from the smallest budget up:
    the best of the filtered candidates inside the window ([budget − tolerance, budget], or ± tolerance for
    `window="around"`) that no smaller budget took, else the best such candidate of the whole chain, else the
    largest candidate under the budget not yet taken, else the sub-net of a smaller budget, shared (noted).
    Raises ConfigError when no candidate is at or under a budget."""
    if window not in BUDGET_WINDOWS:
        raise ConfigError(f"--budget-window '{window}' is unknown; use {' or '.join(BUDGET_WINDOWS)}")
    filtered = chain if filtered is None else filtered
    chosen: dict[float, dict] = {}
    notes: list[str] = []
    taken: set[int] = set()
    for b in sorted(budgets):
        if b >= 1 - _EPS:
            chosen[b] = chain[0]
            taken.add(chain[0]["step"])
            continue
        low, high = _window(b, tolerance, window)
        free = [e for e in chain[1:] if e["step"] not in taken]
        pick = None
        for pool in (filtered[1:], chain[1:]):
            inside = [e for e in pool if e["step"] not in taken and low <= e["macs_fraction"] <= high]
            if inside:
                pick = _pick(inside, better)
                break
        if pick is None:
            under = [e for e in free if e["macs_fraction"] <= b + _EPS]
            if under:
                pick = max(under, key=lambda e: e["macs_fraction"])
        if pick is None:
            shared = [chosen[s] for s in chosen if chosen[s]["macs_fraction"] <= b + _EPS]
            if not shared:
                smallest = min(e["macs_fraction"] for e in chain)
                raise ConfigError(f"no sub-net fits {b:.0%} of the full MACs: the smallest the search reached is "
                                  f"{smallest:.1%}; lower --floor or ask for a larger budget")
            pick = max(shared, key=lambda e: e["macs_fraction"])
            first = min(s for s in chosen if chosen[s] is pick)
            notes.append(f"budgets {b:.0%} and {first:.0%} share one sub-net ({pick['macs_fraction']:.1%} MACs): "
                         f"the search has no other candidate under {b:.0%}; it is built once")
        chosen[b] = pick
        taken.add(pick["step"])
    return chosen, notes


def widths_for_budgets(macs_of: dict[float, float], budgets: Sequence[float], window: str = "under"
                       ) -> tuple[dict[float, float], list[str]]:
    """Uniform-width methods (US-Nets): per budget, the widest width with MACs at or under it (`"under"`), or
    the width whose MACs come closest (`"around"`, ties: the smaller width); under a cap each budget gets its
    own width while one is left, as in `select_for_budgets`. `macs_of`: width → MACs fraction (with 1.0)."""
    if window == "around":
        return {b: min(macs_of, key=lambda w: (abs(macs_of[w] - b), w)) for b in budgets}, []
    # Equal accuracies and a window of the whole [0, budget]: `select_for_budgets` takes the widest untaken width.
    chain = [{"step": i, "width": w, "macs_fraction": m, "accuracy": 0.0}
             for i, (w, m) in enumerate(sorted(macs_of.items(), key=lambda wm: -wm[1]))]
    chosen, notes = select_for_budgets(chain, budgets, tolerance=1.0, window="under")
    return {b: e["width"] for b, e in chosen.items()}, notes
