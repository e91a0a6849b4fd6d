"""The registry of search methods: the built-in ones are there whatever module is imported first, an unknown
name is one line that lists the known ones, a name is taken once, and a method a newcomer registers runs
through `run_search` like the built-in ones."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dyncompile.errors import ConfigError
from dyncompile.search.methods import SEARCH_METHODS, SearchMethod, get_search_method, register_search_method
from dyncompile.search.progressive import run_progressive
from dyncompile.search.result import load_search_result, result_dir
from dyncompile.search.run import SearchOptions, SearchRun, run_search
from dyncompile.search.train import CHECKPOINT_FILE, Checkpoint, Processes
from dyncompile.search.usnet import run_usnet
from tests.search.conftest import REPO, subprocess_env

MODULES = [f"dyncompile.search.{name}" for name in
           ("methods", "run", "progressive", "usnet", "result", "rank", "subnets", "train")] + ["dyncompile.cli.search"]


def test_builtin_methods_are_registered_in_order():
    assert list(SEARCH_METHODS) == ["progressive", "usnet"]
    assert get_search_method("progressive").run is run_progressive
    assert get_search_method("usnet").run is run_usnet


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone_and_sees_the_builtin_methods(module):
    code = (f"import {module}; from dyncompile.search.methods import SEARCH_METHODS; "
            f"assert list(SEARCH_METHODS) == ['progressive', 'usnet'], SEARCH_METHODS")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_unknown_method_is_one_line_listing_the_known_ones():
    with pytest.raises(ConfigError, match=r"^--method 'darts' is unknown; use one of progressive, usnet$"):
        get_search_method("darts")
    with pytest.raises(ConfigError, match="use one of progressive, usnet"):
        SearchOptions(method="darts").check()


def test_a_name_is_registered_once(monkeypatch):
    monkeypatch.setattr("dyncompile.search.methods.SEARCH_METHODS", dict(SEARCH_METHODS))
    progressive = get_search_method("progressive")
    assert register_search_method(progressive) is progressive  # the same method again: harmless
    with pytest.raises(ValueError, match="'progressive' is already registered"):
        register_search_method(SearchMethod("progressive", "another one", run_usnet))


def test_a_registered_method_runs_through_run_search(untrained_workspace, fresh_copy, monkeypatch):
    """All a new method needs: one function of the `SearchRun`, registered; `run_search` runs and saves it."""
    monkeypatch.setattr("dyncompile.search.methods.SEARCH_METHODS", dict(SEARCH_METHODS))

    def run_as_given(run: SearchRun):
        run.measure_given_model()
        return run.finish([run.record("full", None, 1.0)], {})

    register_search_method(SearchMethod("as-given", "the model as given, nothing chosen", run_as_given))
    ws = fresh_copy(untrained_workspace)
    options = SearchOptions(method="as-given", train_limit=64, val_limit=32, train_full=0, calibration_images=64)
    kinds = []
    result = run_search(ws, options, progress=lambda kind, **info: kinds.append(kind), procs=Processes())
    assert result.method == "as-given" and [s.name for s in result.subnets] == ["full"]
    assert load_search_result(ws)[0].subnets == result.subnets
    assert (result_dir(ws, "as-given") / "log.jsonl").is_file()
    assert kinds[0] == "start" and "event" in kinds


def test_run_search_never_drops_an_interrupted_run_silently(untrained_workspace, fresh_copy):
    ws = fresh_copy(untrained_workspace)
    options = SearchOptions(method="usnet", train_limit=64, val_limit=32, epochs=0, calibration_images=64)
    Checkpoint(result_dir(ws, "usnet"), options.fingerprint(), Processes()).save({"model": {}, "state": {}})
    with pytest.raises(ConfigError, match="pass --resume to continue it or --restart to discard it"):
        run_search(ws, options, procs=Processes())
    result = run_search(ws, options, restart=True, procs=Processes())
    assert result.method == "usnet" and not (result_dir(ws, "usnet") / CHECKPOINT_FILE).exists()
