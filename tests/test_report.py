"""`dyncompile report`: the page shows what the workspace holds, says what is missing, and renders in a browser.

The workspace is real (ResNet-20 converted by the CLI), the sub-nets' configs and MACs are real (extracted and
counted), the deployable is a real untuned CPU build of two sub-nets with latencies measured by
`dyncompile.runtime`. Only the search is stood in for (it is not written yet): the accuracies and history
events below are FIXTURE VALUES, made up to exercise the page, not results.
"""

import base64
import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageStat
from typer.testing import CliRunner

from dyncompile.cli import app
from dyncompile.deployable import read_manifest
from dyncompile.fileio import sha256_file
from dyncompile.ir import uniform_config
from dyncompile.measure import count_macs, count_params
from dyncompile.passes.extract import extract_subnet
from dyncompile.report import collect_report, make_report, write_report
from dyncompile.search.result import SearchResult, SubnetRecord, apply_result, save_search_result
from dyncompile.workspace import load_workspace

FACTORY = "dyncompile.zoo.resnet:resnet20_cifar"
runner = CliRunner()

# FIXTURE VALUES (not measured): test accuracies per budget for the two methods, and the model as given.
FIXTURE_ACCURACY = {"progressive": {1.0: 0.9112, 0.75: 0.9034, 0.5: 0.8867, 0.25: 0.8421},
                    "usnet": {1.0: 0.9050, 0.75: 0.8971, 0.5: 0.8790, 0.25: 0.8215}}
FIXTURE_FULL_ACCURACY = 0.9140


def _convert(path: Path) -> Path:
    result = runner.invoke(app, ["convert", FACTORY, "--input-shape", "1,3,32,32", "--workspace", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return path


def _measure(dg, config) -> tuple[int, int]:
    sub = extract_subnet(dg, config)
    return count_macs(sub, dg.input_shape), count_params(sub)


def _progressive_config(dg, width: float) -> dict:
    """A non-uniform config like the search makes: the first stage one group wider, the last one narrower."""
    config = uniform_config(dg, width)
    for name, kept in config.items():
        groups = len(dg.set_by_name(name).groups)
        if name.startswith(("stem", "layers.0")):
            config[name] = min(groups, kept + 1)
        elif name.startswith("layers.2") and kept > 1:
            config[name] = kept - 1
    return config


def _fixture_history(method: str, records: list[SubnetRecord]) -> list[dict]:
    """FIXTURE VALUES: a plausible event log (time_s: seconds since the start).

    progressive: ranking, 12 shrinking steps, one fine-tune, re-selection, joint training; US-Nets: epochs."""
    if method == "usnet":
        return [{"event": "train", "time_s": 40.0 * (epoch + 1), "epoch": epoch, "loss": 0.9 - 0.2 * epoch}
                for epoch in range(3)]
    events = [{"event": "rank", "time_s": 12.5, "method": "noise", "epochs": 1}]
    t, acc = 12.5, 0.912
    for step in range(12):
        t += 3.0
        acc -= 0.004 + 0.001 * step
        events.append({"event": "step", "time_s": round(t, 2), "step": step, "set": f"layers.{step % 3}.0.conv1",
                       "macs_fraction": round(1.0 - 0.07 * (step + 1), 3), "search_accuracy": round(acc, 4),
                       "candidates": 12})
        if step == 7:
            t += 20.0
            acc += 0.02
            events.append({"event": "finetune", "time_s": round(t, 2), "steps": 200, "epochs": 0.5,
                           "accuracy_after": round(acc, 4)})
    events.append({"event": "select", "time_s": round(t + 0.5, 2), "chosen": [r.name for r in records]})
    events.append({"event": "train", "time_s": round(t + 60, 2), "epochs": 2})
    return events


def _search_result(dg, method: str, full_macs: int) -> SearchResult:
    records = []
    for budget, accuracy in FIXTURE_ACCURACY[method].items():
        config = _progressive_config(dg, budget) if method == "progressive" else uniform_config(dg, budget)
        macs, params = _measure(dg, config)
        name = f"macs{round(budget * 100)}" if method == "progressive" else f"w{round(budget * 100)}"
        records.append(SubnetRecord(name=name, config=config, macs=macs, macs_fraction=macs / full_macs,
                                    params=params, accuracy=accuracy, budget=budget,
                                    search_accuracy=accuracy - 0.01 if method == "progressive" else None))
    # the search ranks groups: a fixed shuffle per set stands in for its order (US-Nets keeps channel order)
    g = torch.Generator().manual_seed(0)
    order = {s.name: (torch.randperm(len(s.groups), generator=g).tolist() if method == "progressive"
                      else list(range(len(s.groups)))) for s in dg.free_sets}
    history = _fixture_history(method, records)
    return SearchResult(method=method, subnets=records, group_order=order, full_accuracy=FIXTURE_FULL_ACCURACY,
                        options={"rank": "noise", "seed": 0, "epochs": 2}, history=history,
                        data={"dataset": "fashion-mnist (fixture)", "train": 2000}, wall_s=history[-1]["time_s"] + 1)


@pytest.fixture(scope="module")
def plain_workspace(tmp_path_factory):
    return _convert(tmp_path_factory.mktemp("plain") / "ws")


@pytest.fixture(scope="module")
def full_workspace(tmp_path_factory):
    """A workspace with both searches and a real CPU deployable of two progressive sub-nets, benchmarked."""
    from dyncompile import runtime
    from dyncompile.bench import interleaved_medians, onnx_runner
    from dyncompile.build import build
    from dyncompile.deployable import record_latencies, write_deployable

    ws_path = _convert(tmp_path_factory.mktemp("full") / "ws")
    ws = load_workspace(ws_path)
    full_macs = ws.spec["macs"]
    results = {}
    for method in ("usnet", "progressive"):  # progressive last: it becomes the current result
        results[method] = _search_result(ws.dg, method, full_macs)
        save_search_result(ws_path, results[method], ws.dg.gm.state_dict(), {})
    progressive = results["progressive"]
    dg = apply_result(ws.dg, progressive)
    chosen = {s.name: s.config for s in progressive.subnets if s.budget in (1.0, 0.25)}
    built = build(dg, chosen, target="cpu", tune_trials=0)
    # what `dyncompile build` records about the search its sub-nets come from
    search = {"method": "progressive", "full_accuracy": progressive.full_accuracy,
              "result_sha256": sha256_file(ws_path / "search" / "progressive" / "result.json")}
    out = write_deployable(ws_path / "deploy" / "cpu", built, dg, model=ws.spec["model"],
                           accuracy={s.name: s.accuracy for s in progressive.subnets if s.name in chosen},
                           search=search)
    # timed as `dyncompile bench` times them: TVM and ONNX Runtime taking turns on the same sub-net
    model = runtime.load(out)
    x = np.random.default_rng(0).standard_normal(model.input_shape).astype(np.float32)
    latencies, peers = {}, {}
    for name, config in chosen.items():
        medians = interleaved_medians({"tvm": model.prepared(name, x),
                                       "onnxruntime": onnx_runner(extract_subnet(dg, config).eval(), x)}, repeats=10)
        latencies[name], peers[name] = medians.pop("tvm"), medians
    record_latencies(out, latencies, how={"device": "cpu", "batch": 1, "repeat": 10, "statistic": "median"},
                     peers=peers)
    return ws_path, results, latencies


def _pngs_in(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def _accuracy_text(accuracy: float) -> str:
    return f"{100 * accuracy:.2f}%"


def test_report_shows_subnets_accuracies_widths_history_and_latency(full_workspace, tmp_path):
    ws, results, latencies = full_workspace
    report = make_report(ws, tmp_path / "r" / "report.html")
    page = report.html.read_text()
    for method, result in results.items():
        for s in result.subnets:
            assert f"<b>{s.name}</b>" in page and _accuracy_text(s.accuracy) in page, (method, s.name)
    assert "progressive search" in page and "US-Nets baseline" in page
    assert "Progressive search vs US-Nets, per budget" in page
    # progressive − US-Nets at the 50% budget, from the fixture values
    assert f"{100 * (FIXTURE_ACCURACY['progressive'][0.5] - FIXTURE_ACCURACY['usnet'][0.5]):+.2f}" in page
    # the measured latencies, three decimals, in the target's table, each in the row of its sub-net
    deploy = page[page.index('id="deploy"'):page.index('id="widths"')]
    assert "sub-nets of the progressive search" in deploy
    for name, ms in latencies.items():
        accuracy = _accuracy_text(results["progressive"].subnet(name).accuracy)
        assert re.search(rf"<b>{name}</b>.*?{re.escape(accuracy)}.*?<b>{ms:.3f}</b>", deploy), name
    # ONNX Runtime beside TVM, from the same bench run: its latency and TVM's ratio to it, in the sub-net's row
    peers = {s.name: s.peer_latency_ms["onnxruntime"] for s in read_manifest(ws / "deploy" / "cpu").subnets}
    assert "onnxruntime (ms)" in deploy and "latency ÷ onnxruntime" in deploy
    for name, ms in latencies.items():
        row = deploy[deploy.index(f"<b>{name}</b>"):]
        row = row[:row.index("</tr>")]
        assert f"{peers[name]:.3f}" in row and f"{ms / peers[name]:.2f}" in row, row
    # history: every stage named, with the fine-tune that the fixture recorded
    for stage in ("ranking", "search step", "fine-tuning", "re-selection", "joint training"):
        assert f"<td>{stage}</td>" in page, stage
    # nothing is said to be missing
    assert report.missing == () and 'class="missing"' not in page
    # three plots beside the page and the same three embedded in it, all real PNGs
    assert sorted(p.name for p in report.plots) == ["report-accuracy-macs.png", "report-latency.png",
                                                    "report-search-trajectory.png"]
    embedded = _pngs_in(page)
    assert sorted(embedded) == sorted(p.read_bytes() for p in report.plots)
    for png in embedded:
        image = Image.open(io.BytesIO(png))
        image.load()
        assert image.width > 400 and image.height > 250


def test_widths_cells_name_the_groups_and_channels_each_subnet_keeps(full_workspace, tmp_path):
    ws, results, _ = full_workspace
    page = write_report(ws, tmp_path / "report.html").read_text()
    spec = json.loads((ws / "workspace.json").read_text())
    sets = {s["name"]: s for s in spec["sets"]}
    for method, result in results.items():
        for s in result.subnets:
            for set_name, kept in s.config.items():
                order = result.group_order[set_name]
                channels = sum(sets[set_name]["group_channels"][i] for i in order[:kept])
                groups = ", ".join(map(str, sorted(order[:kept])))
                title = (f"{set_name} in {s.name}: keeps {kept} of {sets[set_name]['groups']} groups "
                         f"({channels} of {sets[set_name]['channels']} channels): groups {groups}")
                assert f'title="{title}"' in page, title
    # one strip box per group per cell: 12 slimmable sets × 8 sub-nets × 8 groups
    assert page.count('<i class="on">') + page.count('<i class="off">') == 12 * 8 * 8


def test_fresh_workspace_report_says_what_is_missing_in_one_line_each(plain_workspace, tmp_path):
    out = tmp_path / "report.html"
    stale = out.with_name("report-accuracy-macs.png")
    stale.write_bytes(b"an old plot")
    report = make_report(plain_workspace, out)
    page = out.read_text()
    assert report.plots == () and not stale.exists()
    assert any("no search run yet: run `dyncompile search`" in line for line in report.missing)
    assert any("no deployable built yet: run `dyncompile build --target cpu`" in line for line in report.missing)
    assert page.count('class="missing"') == len(report.missing) >= 4
    assert "<code>dyncompile search</code>" in page
    # the model summary is there regardless
    assert "dyncompile.zoo.resnet:resnet20_cifar" in page and "40.81 M" in page


def test_damaged_search_result_is_named_in_its_section_and_the_rest_still_renders(full_workspace, tmp_path):
    ws, results, _ = full_workspace
    copy = tmp_path / "ws"
    shutil.copytree(ws, copy)
    (copy / "search" / "usnet" / "result.json").write_text("{ not json")
    report = make_report(copy, tmp_path / "report.html")
    page = report.html.read_text()
    assert "is damaged or from another version; re-run `dyncompile search`" in page
    assert all(f"<b>{s.name}</b>" in page for s in results["progressive"].subnets)


def test_deployable_built_from_an_older_search_is_flagged_and_shows_no_stale_accuracy(full_workspace, tmp_path):
    ws, results, _ = full_workspace
    copy = tmp_path / "ws"
    shutil.copytree(ws, copy)
    rerun = SearchResult.from_json(results["progressive"].to_json())
    for s in rerun.subnets:
        s.accuracy = 0.5  # FIXTURE VALUE: a re-run search whose accuracies differ from the deployed sub-nets'
    save_search_result(copy, rerun, {}, {})
    report = make_report(copy, tmp_path / "report.html")
    assert any("was built from an earlier progressive search result: rebuild it with `dyncompile build --target cpu`"
               in line for line in report.missing)
    deploy = report.html.read_text().split('id="deploy"')[1].split('id="widths"')[0]
    assert "50.00%" not in deploy  # the manifest's own accuracies stay; the new result's are not mixed in


def test_report_keeps_the_old_page_when_writing_fails(plain_workspace, tmp_path, monkeypatch):
    out = write_report(plain_workspace, tmp_path / "report.html")
    before = out.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("dyncompile.fileio.os.replace", fail)  # the report writes through fileio.write_atomic
    with pytest.raises(OSError):
        write_report(plain_workspace, out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left behind


def test_cli_report_default_path_and_json(full_workspace):
    ws, _, _ = full_workspace
    result = runner.invoke(app, ["report", "--workspace", str(ws), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["report"] == str(ws / "report" / "report.html") and Path(info["report"]).is_file()
    assert len(info["plots"]) == 3 and info["missing"] == []
    text = runner.invoke(app, ["report", "--workspace", str(ws), "-o", str(ws / "elsewhere" / "r.html")])
    assert text.exit_code == 0, text.output
    assert str(ws / "elsewhere" / "r.html") in " ".join(text.stdout.split())
    assert (ws / "elsewhere" / "r-accuracy-macs.png").is_file()


def test_cli_report_without_workspace_is_one_red_line(tmp_path):
    result = runner.invoke(app, ["report", "--workspace", str(tmp_path / "nothing")])
    assert result.exit_code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "dyncompile convert" in lines[0]


def test_collect_report_is_plain_json(full_workspace):
    ws, _, _ = full_workspace
    data = collect_report(ws)
    assert json.loads(json.dumps(data)) == data
    assert set(data["search"]["methods"]) == {"progressive", "usnet"} and data["search"]["current"] == "progressive"
    assert [d["target"]["name"] for d in data["deployables"]] == ["cpu"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: Path, png: Path, *, height: int = 2400, timeout_s: float = 90) -> None:
    """Render `page` in headless Chromium into `png` (flags that keep it from stalling as root, offline)."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
                        "--hide-scrollbars", f"--screenshot={png}", f"--window-size=1280,{height}",
                        page.resolve().as_uri()],
                       capture_output=True, timeout=timeout_s, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it as root)")
def test_report_renders_in_headless_chromium(full_workspace, tmp_path):
    ws, _, _ = full_workspace
    page = write_report(ws, tmp_path / "report.html")
    png = tmp_path / "screenshot.png"
    screenshot(page, png)
    assert png.is_file(), "chromium wrote no screenshot"
    image = Image.open(png).convert("L")
    assert image.size == (1280, 2400)
    variance = ImageStat.Stat(image).var[0]
    assert variance > 100, f"the screenshot looks blank (pixel variance {variance:.1f})"
    # text and plots drawn all the way down, not just the background: every 600-pixel band has dark pixels
    for top in range(0, 2400, 600):
        band = image.crop((0, top, 1280, top + 600))
        dark = band.histogram()[:128]
        assert sum(dark) > 0.002 * 1280 * 600, f"hardly any dark pixels between y={top} and {top + 600}"
