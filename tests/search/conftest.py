"""Fixtures of the search tests: tiny converted workspaces (a residual CNN, 3 free channel sets of 4 groups),
one untrained (the search trains it at full width first) and one pre-trained on a little Fashion-MNIST."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dyncompile.convert import convert

REPO = Path(__file__).resolve().parents[2]
FACTORY = "tests.search.tiny_models:tiny_residual_cnn"
INPUT_SHAPE = (1, 1, 28, 28)
GROUPS = 4


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment of a CLI subprocess: one thread per process (2 shared cores: more threads only contend)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="200")
    env.pop("DYNCOMPILE_DEBUG", None)
    env.update(extra)
    return env


def dyncompile_exe() -> str:
    return str(Path(sys.executable).parent / "dyncompile")


@pytest.fixture(scope="session")
def untrained_workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("search-ws") / "untrained"
    torch.manual_seed(0)  # the factory's random initial weights: the same in every session
    convert(FACTORY, workspace=ws, groups=GROUPS, input_shape=INPUT_SHAPE)
    return ws


@pytest.fixture(scope="session")
def trained_workspace(tmp_path_factory) -> Path:
    from tests.search.tiny_models import pretrain, tiny_residual_cnn

    root = tmp_path_factory.mktemp("search-ws")
    torch.manual_seed(0)  # the model's initial weights: the same in every session, whatever ran before
    model = pretrain(tiny_residual_cnn())
    torch.save(model.state_dict(), root / "tiny.pt")
    ws = root / "trained"
    convert(str(root / "tiny.pt"), arch=FACTORY, workspace=ws, groups=GROUPS, input_shape=INPUT_SHAPE)
    return ws


@pytest.fixture
def fresh_copy(tmp_path):
    """fresh_copy(workspace) → a private copy the test may search in."""
    def make(workspace: Path, name: str = "ws") -> Path:
        dst = tmp_path / name
        shutil.copytree(workspace, dst)
        return dst
    return make
