"""Dense prediction end to end (issue 15): a segmentation map and a detector's tuple of outputs go through
convert, verify, extract, `build --target cpu` and the deployable's runtime, and every sub-net's outputs match
the extracted PyTorch sub-net; `search`, which trains classifiers, refuses such models in one line."""

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from dyncompile import runtime
from dyncompile.build import build_deployable
from dyncompile.cli import app
from dyncompile.convert import convert
from dyncompile.deployable import DeployedSubnet, TensorSpec
from dyncompile.ir import output_tensors, uniform_config
from dyncompile.passes.extract import extract_subnet
from dyncompile.passes.rewrite import insert_channel_masks, set_subnet
from dyncompile.pipeline import analyse_model
from dyncompile.verify import verify
from dyncompile.workspace import load_workspace
from dyncompile.zoo import ZOO
from tests.cli_assertions import assert_one_line_error

TOLERANCE = 1e-4  # deployable against PyTorch, float32

# A tiny encoder-decoder with both kinds of dense output: a per-pixel class map (transposed conv and bilinear
# upsampling, skip concat) and box deltas from a head shared by two levels (permute, reshape, cat).
TINY_DENSE = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def block(cin, cout, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class TinyDense(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc1, self.enc2, self.enc3 = block(3, 16), block(16, 24, 2), block(24, 32, 2)
            self.up = nn.ConvTranspose2d(32, 24, 2, stride=2)
            self.dec = block(48, 16)
            self.seg = nn.Conv2d(32, 3, 1)
            self.lateral = nn.Conv2d(24, 32, 1)
            self.box = nn.Conv2d(32, 2 * 4, 3, padding=1)

        def boxes(self, x):
            return self.box(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, 4)

        def forward(self, x):
            s1 = self.enc1(x)
            s2 = self.enc2(s1)
            s3 = self.enc3(s2)
            d = self.dec(torch.cat([self.up(s3), s2], 1))
            d = F.interpolate(d, scale_factor=2.0, mode="bilinear", align_corners=False)
            seg = self.seg(torch.cat([d, s1], 1))
            return seg, torch.cat([self.boxes(s3), self.boxes(self.lateral(s2))], 1)

    def tiny_dense():
        torch.manual_seed(0)
        model = TinyDense()
        with torch.no_grad():  # non-default BN statistics: a wrongly cut statistic must show
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 1.5)
        return model.eval()
""")

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _check_deployable_against_pytorch(path, dg, x: np.ndarray) -> int:
    """Every sub-net of the deployable at `path` against its extracted PyTorch sub-net; returns how many."""
    with runtime.load(path) as model:
        for record in model.manifest.subnets:
            with torch.no_grad():
                expected = output_tensors(extract_subnet(dg, record.config).eval()(torch.from_numpy(x)))
            got = output_tensors(model.run(torch.from_numpy(x), subnet=record.name))
            assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in expected], record.name
            for a, b in zip(got, expected):
                assert torch.allclose(a, b, atol=TOLERANCE, rtol=0), (record.name, float((a - b).abs().max()))
        return len(model.manifest.subnets)


# ── quick: the default suite ──

class SharedHead(nn.Module):
    """One conv applied to the outputs of two independent convs (a head shared by two pyramid levels)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.a(x))).flatten(2), self.head(F.relu(self.b(x))).flatten(2)


def test_a_module_called_twice_cuts_one_weight_for_both_calls():
    """Its inputs from both calls move together: each call alone would cut the shared weight its own way."""
    torch.manual_seed(0)
    dg = analyse_model(SharedHead().eval(), (1, 3, 16, 16), groups=4)
    (shared,) = dg.free_sets
    assert shared.producers == ["a", "b"]
    (head,) = [s for s in dg.sets if "head" in s.producers]
    assert (head.producers, head.fixed_channels) == (["head"], 4), "listed and counted once, not once per call"
    assert all(r.ok for r in verify(dg, [1.0, 0.75, 0.5, 0.25]))
    config = {shared.name: 1}
    sub = extract_subnet(dg, config).eval()
    masked = insert_channel_masks(dg, dg.gm).eval()
    set_subnet(masked, dg, config)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for got, expected in zip(sub(x), masked(x)):
            assert torch.allclose(got, expected, atol=1e-6)
    assert sub.head.in_channels == 4


def test_manifests_of_format_1_still_read_their_single_output():
    record = {"name": "w100", "function": "w100", "config": {}, "macs": 1, "params": 1,
              "output": {"shape": [1, 10], "dtype": "float32"}, "parameters": []}
    assert DeployedSubnet.from_json(record).outputs == (TensorSpec((1, 10), "float32"),)
    two = DeployedSubnet.from_json({**record, "outputs": [{"shape": [1, 5, 8, 8], "dtype": "float32"},
                                                          {"shape": [1, 7, 4], "dtype": "float32"}]})
    assert [t.shape for t in two.outputs] == [(1, 5, 8, 8), (1, 7, 4)]
    assert DeployedSubnet.from_json(two.to_json()) == two


@pytest.fixture(scope="module")
def tiny_dense_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    (root / "tinydense.py").write_text(TINY_DENSE)
    sys.path.insert(0, str(root))
    try:
        ws = root / "ws"
        result = cli("convert", "tinydense:tiny_dense", "--input-shape", "1,3,16,16", "--groups", "4",
                     "--workspace", ws)
        assert result.exit_code == 0, result.output
        yield ws
    finally:
        sys.path.remove(str(root))


def test_tiny_dense_model_converts_builds_and_runs_like_pytorch(tiny_dense_workspace, tmp_path):
    ws = tiny_dense_workspace
    verified = cli("verify", "--workspace", ws, "--widths", "1.0,0.5", "--json")
    assert verified.exit_code == 0, verified.output
    out = build_deployable(ws, target="cpu", widths=(1.0, 0.5), output=tmp_path / "deploy", measure=False).path
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    dg = load_workspace(ws).dg
    assert _check_deployable_against_pytorch(out, dg, x) == 2

    np.save(tmp_path / "x.npy", x)
    answer = cli("run", out, "--input", tmp_path / "x.npy", "--subnet", "w50", "--json")
    assert answer.exit_code == 0, answer.output
    record = json.loads(answer.stdout)
    assert record["shape"] == [[1, 3, 16, 16], [1, 160, 4]], "one entry per output"
    with torch.no_grad():
        expected = extract_subnet(dg, uniform_config(dg, 0.5)).eval()(torch.from_numpy(x))
    for got, want in zip(record["output"], expected):
        assert np.allclose(np.array(got, dtype=np.float32), want.numpy(), atol=TOLERANCE, rtol=0)
    saved = cli("run", out, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npz")
    assert saved.exit_code == 0, saved.output
    with np.load(tmp_path / "y.npz") as y:
        assert sorted(y.files) == ["output_0", "output_1"]
    assert_one_line_error(cli("run", out, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy"),
                          "give --output a .npz path")


def test_search_refuses_dense_prediction_in_one_line(tiny_dense_workspace, tmp_path):
    """Checked before the data is opened: search scores accuracy on labels, which a map or a tuple has none of."""
    assert_one_line_error(cli("search", "--workspace", tiny_dense_workspace, "--data", tmp_path / "none"),
                          "dense prediction", "not supported yet")


# ── slow: each dense zoo model through the whole product path ──

@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet-aspp-seg", "fpn-two-head-det"])
def test_zoo_dense_model_converts_verifies_extracts_and_builds_for_cpu(name, tmp_path):
    entry = ZOO[name]
    result = convert(entry.factory, workspace=tmp_path / "ws", input_shape=entry.input_shape)
    assert result.full_width_error == 0
    widths = (1.0, 0.75, 0.5, 0.25)
    reports = verify(result.dg, list(widths))
    assert all(r.ok for r in reports), [(r.width, r.problems) for r in reports]
    for width in widths:  # the extracted sub-nets are physically smaller and keep the output shapes
        sub = extract_subnet(result.dg, uniform_config(result.dg, width)).eval()
        with torch.no_grad():
            shapes = [tuple(t.shape) for t in output_tensors(sub(torch.zeros(entry.input_shape)))]
        assert shapes == [tuple(s) for s in entry.output_shapes]
    built = build_deployable(tmp_path / "ws", target="cpu", widths=widths, measure=False)
    assert [len(s.outputs) for s in built.manifest.subnets] == [len(entry.output_shapes)] * len(widths)
    x = np.random.default_rng(0).standard_normal(entry.input_shape).astype(np.float32)
    assert _check_deployable_against_pytorch(built.path, result.dg, x) == len(widths)
