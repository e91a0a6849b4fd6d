"""`dyncompile search` with bad inputs: one red line that says what to do, exit code 2, no traceback, nothing
written to the workspace."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dyncompile.cli import app

runner = CliRunner()
QUICK = ["--train-limit", "64", "--val-limit", "32", "--epochs", "0.1", "--batch-size", "32"]


def search(*args) -> object:
    return runner.invoke(app, ["search", *[str(a) for a in args]])


def assert_one_line_error(result, *fragments, code=2, only_line=True):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "internal error:"))]
    assert len(errors) == 1 and errors[0].startswith("error:"), result.stderr
    assert lines[-1] == errors[0]
    if only_line:
        assert len(lines) == 1, result.stderr
    text = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in text, text


def assert_untouched(ws):
    assert not (ws / "search").exists()


def test_missing_workspace(tmp_path):
    assert_one_line_error(search("--workspace", tmp_path / "nowhere", *QUICK), "no workspace at", "dyncompile convert")


def test_wrong_data_path(untrained_workspace, fresh_copy, tmp_path):
    ws = fresh_copy(untrained_workspace)
    assert_one_line_error(search("--workspace", ws, "--data", tmp_path / "no-such-data", *QUICK), "does not exist",
                          "fashion-mnist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(search("--workspace", ws, "--data", empty, *QUICK), str(empty))
    assert_one_line_error(search("--workspace", ws, "--data", "mnist-of-fashion", *QUICK), "mnist-of-fashion")
    assert_untouched(ws)


@pytest.mark.parametrize("option, value, fragment", [
    ("--method", "darts", "use one of progressive, usnet"),
    ("--rank", "random", "use noise or l1"),
    ("--rank-direction", "backwards", "use tolerant-first or sensitive-first"),
    ("--threshold-mode", "relative", "use drop or absolute"),
])
def test_unknown_choices(untrained_workspace, fresh_copy, option, value, fragment):
    ws = fresh_copy(untrained_workspace)
    assert_one_line_error(search("--workspace", ws, option, value, *QUICK), f"'{value}' is unknown", fragment)
    assert_untouched(ws)


@pytest.mark.parametrize("option, value, fragment", [
    ("--finetune-check-images", "0", "a check every 4 steps of 128"),
    ("--lazy-scores", "0", "at least 1"),
])
def test_out_of_range_numbers(untrained_workspace, fresh_copy, option, value, fragment):
    ws = fresh_copy(untrained_workspace)
    assert_one_line_error(search("--workspace", ws, option, value, *QUICK), option, fragment)
    assert_untouched(ws)


@pytest.mark.parametrize("subnets", ["abc", "0.5;1.0", "0.5,1.5", "0", "-0.25,1", ",", "nan"])
def test_malformed_subnets(untrained_workspace, fresh_copy, subnets):
    ws = fresh_copy(untrained_workspace)
    assert_one_line_error(search("--workspace", ws, "--subnets", subnets, *QUICK), "--subnets", "0.25,0.5,0.75,1.0")
    assert_untouched(ws)


@pytest.mark.parametrize("json_flag", [True, False])
def test_budget_no_subnet_can_meet(untrained_workspace, fresh_copy, json_flag):
    """Every set at its 25% floor still keeps ~7% of the MACs: 1% cannot be met. With --json the error is the
    only line; without, it follows the run's header and data notes."""
    ws = fresh_copy(untrained_workspace)
    args = ["--workspace", ws, "--subnets", "0.01,0.5,1.0", *QUICK] + (["--json"] if json_flag else [])
    result = search(*args)
    assert_one_line_error(result, "--subnets 0.01 cannot be met", "lower --floor", only_line=json_flag)
    assert result.stdout == ""
    assert not (ws / "search" / "progressive" / "result.json").exists()


def test_resume_with_other_options_is_refused_and_restart_discards(untrained_workspace, fresh_copy):
    """A checkpoint made with other options is never resumed silently (nor overwritten): one line; --restart
    discards it and runs."""
    from dyncompile.search.result import load_search_result, result_dir
    from dyncompile.search.run import SearchOptions
    from dyncompile.search.train import Checkpoint, Processes

    ws = fresh_copy(untrained_workspace)
    other = SearchOptions(train_limit=64, val_limit=32, epochs=0.2, batch_size=32)  # not QUICK's epochs
    checkpoint = Checkpoint(result_dir(ws, "progressive"), other.fingerprint(), Processes())
    checkpoint.save({"model": {}, "state": {"done": []}})
    before = checkpoint.path.read_bytes()
    assert_one_line_error(search("--workspace", ws, *QUICK, "--resume", "--json"), "made with other options",
                          "--restart")
    assert checkpoint.path.read_bytes() == before
    assert_one_line_error(search("--workspace", ws, *QUICK, "--json"), "--resume", "--restart")
    result = search("--workspace", ws, *QUICK, "--subnets", "0.5,1.0", "--restart", "--json")
    assert result.exit_code == 0, result.output
    assert not checkpoint.path.exists() and load_search_result(ws) is not None
