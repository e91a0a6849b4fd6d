"""Checks the pass tests share: channel sets by producer, and `verify` at the widths the CLI checks."""

from dyncompile.verify import verify

WIDTHS = [1.0, 0.75, 0.5, 0.25]


def sets_by_producer(dg):
    return {p: s for s in dg.sets for p in s.producers}


def assert_verifies(dg):
    for r in verify(dg, WIDTHS):
        assert r.ok, (r.width, r.problems)
