"""What the wheel ships: every source folder is a listed package (scripts/check-install.sh builds and runs the real
wheel outside the checkout; this is the fast guard), and the command line answers `--version` and `python -m`."""

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_source_folder_is_a_listed_package():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for package, folder in setuptools["package-dir"].items():
        for source in (REPO / folder).rglob("*.py"):
            if "__pycache__" in source.parts:
                continue
            rel = source.parent.relative_to(REPO / folder)
            found.add(".".join([package, *rel.parts]))
            assert (source.parent / "__init__.py").is_file(), f"{source.parent} has no __init__.py"
    assert found - listed == set(), "folders with modules that the wheel would leave out"
    assert {"dyncompile.search", "dyncompile.zoo"} <= listed


def test_version_names_dyncompile_torch_and_tvm():
    done = subprocess.run([sys.executable, "-m", "dyncompile", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    import dyncompile
    import torch
    import tvm

    line = done.stdout.strip()
    assert f"dyncompile {dyncompile.__version__}" in line
    assert f"torch {torch.__version__}" in line
    assert f"apache-tvm {tvm.__version__}" in line
