"""Every model of the in-repo zoo (examples/zoo) builds, runs, and traces (or fails to trace) as declared."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
from dyncompile.zoo import FEATURES, ZOO, build  # `examples` is importable via pytest's pythonpath

ZOO_DIR = REPO_ROOT / "examples" / "zoo"
# Features that stop plain torch.fx symbolic tracing: models with one need the converter's concrete fallback.
UNTRACEABLE_FEATURES = {"python_loop", "shape_assert", "size_factory", "forward_flag", "batch_python"}


def test_registry_entries_are_well_formed():
    assert len(ZOO) >= 40
    for name, entry in ZOO.items():
        assert entry.name == name
        module_name, sep, function_name = entry.factory.partition(":")
        assert sep and module_name.startswith("dyncompile.zoo.") and function_name.isidentifier(), entry.factory
        assert (ZOO_DIR / (module_name.removeprefix("dyncompile.zoo.") + ".py")).is_file(), entry.factory
        assert len(entry.input_shape) == 4 and entry.input_shape[:2] == (1, 3), entry.input_shape
        assert entry.input_shape[2:] in ((32, 32), (224, 224))
        assert entry.features and set(entry.features) <= set(FEATURES), set(entry.features) - set(FEATURES)
        assert entry.needs_fallback == bool(UNTRACEABLE_FEATURES & set(entry.features)), name


def test_every_feature_tag_is_used():
    used = {tag for entry in ZOO.values() for tag in entry.features}
    assert used == set(FEATURES), set(FEATURES) - used


def test_zoo_sources_are_plain_torch():
    for path in ZOO_DIR.glob("*.py"):
        source = path.read_text()
        assert "manual_seed" not in source, path.name
        assert "import dyncompile" not in source and "from dyncompile" not in source, path.name


def test_importing_the_registry_imports_no_model_module():
    code = (
        "import sys, dyncompile.zoo as zoo; "
        "loaded = [m for m in sys.modules if m.startswith('dyncompile.zoo.')]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


@pytest.mark.parametrize("name", list(ZOO))
def test_model_runs_and_traces_as_declared(name):
    entry = ZOO[name]
    torch.manual_seed(0)
    model = build(name)
    assert isinstance(model, nn.Module)
    model = model.eval().double()
    x = torch.randn((2, *entry.input_shape[1:]), dtype=torch.float64)

    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, entry.num_classes)
        assert torch.isfinite(out).all()
        assert torch.equal(model(x), out), "not deterministic in eval mode"

        if entry.needs_fallback:
            with pytest.raises((fx.proxy.TraceError, TypeError)):  # TypeError: torch.zeros(proxy), int(proxy)
                fx.symbolic_trace(model)
        else:
            traced = fx.symbolic_trace(model)
            assert torch.equal(traced(x), out)
