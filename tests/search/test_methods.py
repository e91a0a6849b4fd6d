"""The registry of search methods: the built-in ones are there whatever module is imported first, an unknown
name is one line that lists the known ones, and a name is taken once."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dyncompile.errors import ConfigError
from dyncompile.search.methods import SEARCH_METHODS, SearchMethod, get_search_method, register_search_method
from dyncompile.search.progressive import run_progressive
from dyncompile.search.run import SearchOptions
from dyncompile.search.usnet import run_usnet
from tests.search.conftest import REPO, subprocess_env

MODULES = [f"dyncompile.search.{name}" for name in
           ("methods", "run", "progressive", "usnet", "result", "rank", "subnets", "train")] + ["dyncompile.cli_search"]


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
