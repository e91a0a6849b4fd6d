"""The command line as a user meets it: convert → verify → inspect, and one clear line for every bad input."""

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dyncompile.cli import app
from dyncompile.errors import ConfigError, ExtractionError, InternalError
from tests.cli_assertions import assert_one_line_error

FACTORY = "dyncompile.zoo.resnet:resnet20_cifar"
SHAPE = "1,3,32,32"
runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws") / "w"
    result = run("convert", FACTORY, "--input-shape", SHAPE, "--workspace", ws, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["free_sets"] >= 10 and summary["full_width_error"] == 0.0
    return ws


def test_verify_json_one_record_per_width(workspace):
    result = run("verify", "--workspace", workspace, "--json", "--widths", "1.0,0.5,0.25")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["width"] for r in records] == [1.0, 0.5, 0.25]
    assert all(r["ok"] for r in records)
    assert records[0]["macs_fraction"] == 1.0 and records[-1]["macs_fraction"] < 0.2


def test_inspect_json_and_table(workspace):
    report = json.loads(run("inspect", "--workspace", workspace, "--json").stdout)
    assert report["groups"] == 8 and report["input_shape"] == [1, 3, 32, 32]
    assert any(len(s["producers"]) == 4 for s in report["sets"])  # stem + the residual stream of stage 1
    table = run("inspect", "--workspace", workspace)
    assert table.exit_code == 0 and "channel sets" in table.stdout


def test_console_script_installed():
    out = subprocess.run([str(Path(sys.executable).parent / "dyncompile"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "convert" in out.stdout and "verify" in out.stdout


def test_tampered_workspace_is_refused(workspace, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(workspace, copy)
    tensors = copy / "graph.tensors.pt"
    data = bytearray(tensors.read_bytes())
    data[-100] ^= 0xFF
    tensors.write_bytes(bytes(data))
    assert_one_line_error(run("verify", "--workspace", copy), "was changed after convert")


def test_workspace_with_code_injected_and_checksums_fixed_is_refused(workspace, tmp_path):
    import hashlib
    import shutil

    copy = tmp_path / "evil"
    shutil.copytree(workspace, copy)
    graph = json.loads((copy / "graph.json").read_text())
    node = next(n for n in graph["nodes"] if n["op"] == "call_function")
    node["target"] = "os:system"
    (copy / "graph.json").write_text(json.dumps(graph))
    spec = json.loads((copy / "workspace.json").read_text())
    spec["files"]["graph.json"] = hashlib.sha256((copy / "graph.json").read_bytes()).hexdigest()
    (copy / "workspace.json").write_text(json.dumps(spec))
    assert_one_line_error(run("inspect", "--workspace", copy), "os")


def test_missing_workspace():
    assert_one_line_error(run("verify", "--workspace", "/nonexistent/ws"), "dyncompile convert")


@pytest.fixture
def model_files(tmp_path, monkeypatch):
    from dyncompile.zoo.resnet import resnet20_cifar

    model = resnet20_cifar().eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save(model, tmp_path / "whole.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00not a torch file" * 10)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_state_dict_needs_arch_then_converts(model_files):
    assert_one_line_error(run("convert", "weights.pt", "--input-shape", SHAPE), "--arch")
    ok = run("convert", "weights.pt", "--arch", FACTORY, "--input-shape", SHAPE, "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["model"]["kind"] == "state_dict"
    assert (model_files / "dyncompile-workspace" / "workspace.json").is_file()  # default workspace: current folder


def test_pickled_module_needs_explicit_trust(model_files):
    assert_one_line_error(run("convert", "whole.pt", "--input-shape", SHAPE), "--trust-pickle")
    ok = run("convert", "whole.pt", "--trust-pickle", "--input-shape", SHAPE, "--workspace", "ws-pickle")
    assert ok.exit_code == 0, ok.output


@pytest.mark.parametrize("args, fragments", [
    (["missing.pt"], ["does not exist"]),
    (["corrupt.pt"], ["not a valid PyTorch file"]),
    (["no_such_module:factory"], ["cannot import"]),
    (["weights.pt", "--arch", "dyncompile.zoo.vgg:vgg11_bn_cifar"], ["does not fit"]),
    ([FACTORY, "--input-shape", "1,5,32,32"], ["--input-shape"]),
    ([FACTORY, "--input-shape", "a,b"], ["not a list of integers"]),
    ([FACTORY, "--input-shape", SHAPE, "--groups", "0"], ["--groups"]),
    ([FACTORY, "--input-shape", SHAPE, "--groups", "1000"], ["--groups 1000", "at most 64"]),
    ([FACTORY, "--input-shape", SHAPE, "--leaf", "no.such.module"], ["--leaf"]),
    ([FACTORY, "--input-shape", SHAPE, "--grouped-conv", "sideways"], ["--grouped-conv"]),
])
def test_bad_convert_inputs_one_line_and_workspace_untouched(model_files, args, fragments):
    good = run("convert", FACTORY, "--input-shape", SHAPE, "--workspace", "ws")
    assert good.exit_code == 0
    before = {p.name: p.read_bytes() for p in (model_files / "ws").iterdir()}
    assert_one_line_error(run("convert", *args, "--workspace", "ws"), *fragments)
    after = {p.name: p.read_bytes() for p in (model_files / "ws").iterdir()}
    assert before == after, "a failed convert must not touch an existing workspace"


def test_untraceable_model_names_line_and_leaf(tmp_path, monkeypatch):
    name = f"usermodel_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Gate(nn.Module):
            def forward(self, x):
                if x.mean() > 0:  # data-dependent control flow
                    return x * 2
                return x

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 16, 3, padding=1)
                self.gate = Gate()
                self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
                self.fc = nn.Linear(16, 10)

            def forward(self, x):
                x = self.conv2(torch.relu(self.gate(self.conv(x))))
                return self.fc(x.mean((2, 3)))

        def net():
            return Net()
    """))
    monkeypatch.chdir(tmp_path)
    result = run("convert", f"{name}:net", "--input-shape", "1,3,16,16")
    assert_one_line_error(result, f"{name}.py:7", "if x.mean() > 0", "--leaf gate")
    ok = run("convert", f"{name}:net", "--input-shape", "1,3,16,16", "--leaf", "gate", "--json")
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)
    assert any("module 'gate'" in why for why in report["fixed_reasons"])  # the opaque module stays full width
    checked = run("verify", "--json", "--widths", "1.0,0.5")  # the workspace rebuilds the leaf from the factory
    assert checked.exit_code == 0, checked.output


@pytest.mark.parametrize("error, code, fragment", [
    (ConfigError("widths must be in (0, 1]"), 2, "error: widths must be in (0, 1]"),
    (ExtractionError("labels vary along dims [1, 2]"), 3, "internal error: ExtractionError"),
    (InternalError("a broken invariant"), 3, "internal error: InternalError"),
])
def test_user_mistakes_exit_2_and_dyncompile_bugs_exit_3(workspace, monkeypatch, error, code, fragment):
    """An analysis invariant broken (ExtractionError) is a bug to report, not the user's input: exit 3."""
    import dyncompile.verify

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(dyncompile.verify, "verify", broken)
    result = run("verify", "-w", str(workspace), "--widths", "0.5")
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(fragment), result.stderr
    assert "Traceback" not in result.output
    if code == 3:
        assert "a dyncompile bug" in result.stderr


def test_convert_group_multiple_sizes_groups_and_survives_reloading(tmp_path):
    ws = tmp_path / "w8"
    result = run("convert", FACTORY, "--input-shape", SHAPE, "--workspace", ws, "--group-multiple", "8", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert any("--group-multiple 8" in note for note in summary["notes"])  # what it cost in granularity
    from dyncompile.workspace import load_workspace

    dg = load_workspace(ws).dg  # the analysis is redone on load with the same multiple
    assert dg.group_multiple == 8
    assert json.loads(run("inspect", "--workspace", ws, "--json").stdout)["group_multiple"] == 8
    assert all(c % 8 == 0 for s in dg.free_sets for c in s.group_channels)  # ResNet-20: 16, 32, 64 channels
    assert_one_line_error(run("convert", FACTORY, "--input-shape", SHAPE, "--workspace", tmp_path / "x",
                              "--group-multiple", "none"), "--group-multiple")
