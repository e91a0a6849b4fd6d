"""The search methods, by name: what `--method` and `SearchOptions.method` choose from.

A method is a function that runs its phases on a `dyncompile.search.run.SearchRun` (the weights, data,
checkpoint, log and training loop every method shares) and returns `search_run.finish(records, group_order)`.
Its module registers it once, at import:

    def run_greedy(run: SearchRun) -> SearchResult:
        ...
        return run.finish(records, group_order)

    register_search_method(SearchMethod("greedy", "one-line summary for --help", run_greedy))

The built-in methods (`progressive`, `usnet`) are imported, and so registered, by `dyncompile/search/__init__.py`;
a new built-in one is added to that import line. This module imports nothing of the search, so every method
module can import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dyncompile.errors import ConfigError
from dyncompile.search.result import SearchResult

__all__ = ["SearchMethod", "SEARCH_METHODS", "register_search_method", "get_search_method"]


@dataclass(frozen=True)
class SearchMethod:
    """A named way of choosing sub-nets. `run` receives the `SearchRun` (not imported here: it imports this)."""

    name: str  # what --method takes; also the result's folder, <workspace>/search/<name>/
    summary: str  # one line for --method's help
    run: Callable[[Any], SearchResult]
    default_rank: str = "none"  # the channel-group ranking `--rank` defaults to (`dyncompile.search.rank.RANKINGS`)


SEARCH_METHODS: dict[str, SearchMethod] = {}  # in registration order: the order --help lists them in


def register_search_method(method: SearchMethod) -> SearchMethod:
    """Make `method` available under its name; a name already taken by another method raises ValueError."""
    taken = SEARCH_METHODS.get(method.name)
    if taken is not None and taken != method:
        raise ValueError(f"search method {method.name!r} is already registered")
    SEARCH_METHODS[method.name] = method
    return method


def get_search_method(name: str) -> SearchMethod:
    """The method registered as `name`; ConfigError (one line, listing the known names) if there is none."""
    method = SEARCH_METHODS.get(name)
    if method is None:
        raise ConfigError(f"--method '{name}' is unknown; use one of {', '.join(SEARCH_METHODS)}")
    return method
