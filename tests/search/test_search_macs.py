"""The search's MACs of a configuration follow the group order: a cached count must not survive a reordering."""

from __future__ import annotations

from dyncompile.convert import convert
from dyncompile.measure import count_macs
from dyncompile.search.run import SearchOptions, SearchRun
from dyncompile.search.train import Processes
from tests.search.tiny_models import TinyResidualCNN


def uneven_cnn() -> TinyResidualCNN:
    """10 channels in 4 groups: 3, 3, 2, 2 channels, so which groups a sub-net keeps changes its MACs."""
    return TinyResidualCNN(width=10)


def test_macs_are_recounted_after_the_groups_are_reordered(tmp_path):
    ws = tmp_path / "ws"
    convert("tests.search.test_search_macs:uneven_cnn", workspace=ws, groups=4, input_shape=(1, 1, 28, 28))
    run = SearchRun(ws, SearchOptions(data="fashion-mnist", train_limit=64, val_limit=64, seed=0), procs=Processes())
    uneven = next(s for s in run.dg.free_sets if len(set(s.group_channels)) > 1)
    one_group = {uneven.name: 1}
    before = run.macs(one_group)  # cached under the original order: the first group has 3 channels
    run.reorder_groups({s.name: list(reversed(range(len(s.groups)))) for s in run.dg.free_sets})
    assert uneven.group_channels[0] < 3  # the first group is now one of the 2-channel ones
    expected = count_macs(run.net.skeleton(one_group).module, (1, 1, 28, 28))
    assert run.macs(one_group) == expected < before
