"""`dyncompile report`: one self-contained HTML page about a workspace, with its plots beside it as PNG files.

    workspace.json                  ─┐
    search/<method>/result.json     ─┼─▶ collect_report() ─▶ a JSON-able dict ─▶ write_report() ─▶ report.html
    deploy/<target>/manifest.json   ─┘                                           (+ report-*.png beside it)

    from dyncompile.report import write_report
    write_report("dyncompile-workspace", "dyncompile-workspace/report/report.html")

The page reads only the JSON the other steps leave (no model, no tensors, no TVM): the accuracy–MACs front of
the sub-nets (progressive search beside the US-Nets baseline when both ran), accuracy–latency per target, which
channel groups every sub-net keeps in every channel set, the search history, each deployable's latency table,
and the model and its conversion. A section whose data does not exist yet says so in one line, with the
command that makes it; a damaged search result or deployable is named in its section instead of stopping
the whole report. Plots need matplotlib (a dependency); the PNGs are embedded as base64, so the HTML file
alone is the whole report. Every file is written to a temporary name and renamed into place, the HTML last.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import dyncompile
from dyncompile.deployable import MANIFEST, read_manifest
from dyncompile.errors import DyncompileError
from dyncompile.fileio import sha256_file, write_atomic
from dyncompile.search.result import RESULT_FILE, SEARCH_DIR, load_search_result
from dyncompile.workspace import read_spec

__all__ = ["Report", "REPORT_DIR", "REPORT_FILE", "default_report_path", "collect_report", "make_report",
           "write_report"]

REPORT_DIR = "report"
REPORT_FILE = "report.html"
METHOD_ORDER = ("progressive", "usnet")
METHOD_LABELS = {"progressive": "progressive search", "usnet": "US-Nets baseline"}
EVENT_LABELS = {"rank": "ranking", "step": "search step", "finetune": "fine-tuning", "select": "re-selection",
                "train": "joint training", "calibrate": "BN calibration", "train_full": "full-width training"}
# plot name → file suffix; files are "<report stem>-<suffix>.png" beside the HTML
PLOTS = {"accuracy_macs": "accuracy-macs", "latency": "latency", "search": "search-trajectory"}
_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


@dataclass(frozen=True)
class Report:
    """What `make_report` wrote: the page, its plot files, and one line per section that had no data."""

    html: Path
    plots: tuple[Path, ...]
    missing: tuple[str, ...]

    def to_json(self) -> dict:
        return {"report": str(self.html), "plots": [str(p) for p in self.plots], "missing": list(self.missing)}


def default_report_path(workspace: str | Path) -> Path:
    return Path(workspace) / REPORT_DIR / REPORT_FILE


# ── collecting: everything the page shows, as plain JSON ──

def _methods_present(workspace: Path) -> list[str]:
    found = sorted(p.parent.name for p in (workspace / SEARCH_DIR).glob(f"*/{RESULT_FILE}"))
    return [m for m in METHOD_ORDER if m in found] + [m for m in found if m not in METHOD_ORDER]


def _current_method(workspace: Path) -> str | None:
    try:
        return json.loads((workspace / SEARCH_DIR / "current.json").read_text())["method"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _collect_search(workspace: Path) -> dict:
    methods: dict[str, dict] = {}
    for method in _methods_present(workspace):
        try:
            loaded = load_search_result(workspace, method, tensors=False)
        except DyncompileError as exc:
            methods[method] = {"error": str(exc)}
            continue
        if loaded is not None:
            # a deployable records the hash of the result it was built from: this tells if it is stale
            methods[method] = {**loaded[0].to_json(),
                               "result_sha256": sha256_file(workspace / SEARCH_DIR / method / RESULT_FILE)}
    return {"current": _current_method(workspace), "methods": methods}


def _collect_deployables(workspace: Path) -> list[dict]:
    out = []
    for manifest_path in sorted((workspace / "deploy").glob(f"*/{MANIFEST}")):
        folder = manifest_path.parent
        try:
            manifest = read_manifest(folder, verify_files=False)
        except DyncompileError as exc:
            out.append({"path": str(folder), "target": {"name": folder.name}, "error": str(exc), "subnets": []})
            continue
        # the per-parameter slicing recipes are for the runtime, not for people
        subnets = [{k: v for k, v in s.to_json().items() if k not in ("parameters", "function", "transform_function")}
                   for s in manifest.subnets]
        out.append({"path": str(folder), "target": manifest.target.to_json(), "created": manifest.created,
                    "versions": manifest.versions, "input": manifest.input.to_json(),
                    "tuning": None if manifest.tuning is None else manifest.tuning.to_json(),
                    "latency": manifest.latency, "weights_bytes": manifest.weights.bytes,
                    "search": manifest.search, "subnets": subnets})
    return out


def collect_report(workspace: str | Path) -> dict:
    """Everything the report shows, read from the workspace's JSON files (no tensors, no TVM)."""
    workspace = Path(workspace)
    spec = read_spec(workspace)
    sets = [{"name": s["name"], "channels": s["channels"], "groups": s["groups"], "group_channels": s["group_channels"],
             "producers": s["producers"], "fixed_channels": s.get("fixed_channels", 0),
             "fixed_reasons": s.get("fixed_reasons", [])} for s in spec["sets"]]
    model = {k: spec.get(k) for k in ("model", "input_shape", "groups", "trace_mode", "grouped_conv_mode",
                                      "leaf_modules", "macs", "params", "fixed_reasons", "created", "dyncompile",
                                      "torch")}
    return {"workspace": str(workspace), "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "dyncompile": dyncompile.__version__, "model": {**model, "sets": sets},
            "search": _collect_search(workspace), "deployables": _collect_deployables(workspace)}


# ── small formatting helpers ──

def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _pct(accuracy: float | None) -> float | None:
    """Accuracy as a percentage; search stores fractions in [0, 1] (a value above 1 is taken as a percentage)."""
    if accuracy is None or not isinstance(accuracy, (int, float)) or math.isnan(accuracy):
        return None
    return 100.0 * accuracy if accuracy <= 1.0 else float(accuracy)


def _fmt_acc(accuracy: float | None) -> str:
    p = _pct(accuracy)
    return "—" if p is None else f"{p:.2f}%"


def _fmt_num(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _mmacs(macs: int | None) -> str:
    return "—" if macs is None else f"{macs / 1e6:.2f}"


def _model_name(model: dict) -> str:
    source = (model.get("model") or {}).get("location") or "model"
    return source.rsplit(":", 1)[-1] if ":" in source else Path(source).name


def _seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _note(text: str) -> str:
    """One line for a section without data; `…` spans become code."""
    parts = text.split("`")
    body = "".join(f"<code>{_e(p)}</code>" if i % 2 else _e(p) for i, p in enumerate(parts))
    return f'<p class="missing">{body}</p>'


def _table(head: list[str], rows: Iterable[list[str]], *, numeric_from: int = 1, cls: str = "") -> str:
    """An HTML table; cells are already-escaped HTML; columns from `numeric_from` on are right-aligned."""
    def cells(row, tag):
        return "".join(f'<{tag}{" class=num" if i >= numeric_from else ""}>{c}</{tag}>' for i, c in enumerate(row))
    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{cells(head, "th")}</tr></thead><tbody>{body}</tbody></table>'


def _method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _deploy_label(d: dict) -> str:
    """The target's name, and the folder's when it differs (two builds for one target, e.g. tuned and not)."""
    target, folder = d["target"].get("name", "?"), Path(d["path"]).name
    return target if folder == target else f"{target} ({folder})"


# ── plots (matplotlib, Agg; PNG bytes) ──

def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False,
                         "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 110, "savefig.dpi": 110})
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _label_points(ax, xs, ys, names, color) -> None:
    for x, y, n in zip(xs, ys, names):
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, -11), fontsize=8, color=color)


def _plot_accuracy_macs(plt, data: dict) -> bytes | None:
    methods = {m: r for m, r in data["search"]["methods"].items() if "error" not in r and r.get("subnets")}
    if not methods or not any(_pct(s.get("accuracy")) is not None for r in methods.values() for s in r["subnets"]):
        return None
    full_macs = data["model"]["macs"] or 1
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    full_acc = None
    for i, (method, result) in enumerate(methods.items()):
        pts = sorted((100 * s["macs"] / full_macs, _pct(s["accuracy"]), s["name"]) for s in result["subnets"]
                     if _pct(s.get("accuracy")) is not None)
        xs, ys, names = zip(*pts)
        color = _COLORS[i % len(_COLORS)]
        ax.plot(xs, ys, marker="o" if i == 0 else "s", linestyle="-" if i == 0 else "--", color=color,
                label=_method_label(method), markersize=6)
        _label_points(ax, xs, ys, names, color)
        full_acc = full_acc if full_acc is not None else _pct(result.get("full_accuracy"))
    if full_acc is not None:
        ax.axhline(full_acc, color="#555", linestyle=":", linewidth=1, label=f"model as given ({full_acc:.2f}%)")
    ax.set_xlabel(f"MACs, % of the full model (100% = {full_macs / 1e6:.1f} M)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlim(0, 105)
    ax.set_title("Accuracy vs MACs of the chosen sub-nets")
    ax.legend(loc="lower right", fontsize=9)
    return _png(fig)


def _plot_latency(plt, data: dict, accuracy_of) -> bytes | None:
    """MACs vs latency per target (always), and accuracy vs latency beside it for targets with accuracies."""
    timed = [d for d in data["deployables"] if any(s.get("latency_ms") for s in d["subnets"])]
    if not timed:
        return None
    full_macs = data["model"]["macs"] or 1
    with_acc = [d for d in timed if any(s.get("latency_ms") and accuracy_of(d, s) is not None for s in d["subnets"])]
    fig, axes = plt.subplots(1, 2 if with_acc else 1, figsize=(11.5 if with_acc else 7.6, 4.2), squeeze=False)
    panels = [(axes[0][0], timed, lambda d, s: 100 * s["macs"] / full_macs, "MACs, % of the full model",
               "MACs vs latency")]
    if with_acc:
        panels.append((axes[0][1], with_acc, lambda d, s: _pct(accuracy_of(d, s)), "test accuracy (%)",
                       "Accuracy vs latency"))
    latencies = [s["latency_ms"] for d in timed for s in d["subnets"] if s.get("latency_ms")]
    log_x = max(latencies) / min(latencies) > 30  # e.g. a desktop CPU beside an (emulated) board
    for ax, deployables, y_of, ylabel, title in panels:
        for d in deployables:
            pts = sorted((s["latency_ms"], y_of(d, s), s["name"]) for s in d["subnets"]
                         if s.get("latency_ms") and y_of(d, s) is not None)
            if not pts:
                continue
            xs, ys, names = zip(*pts)
            color = _COLORS[timed.index(d) % len(_COLORS)]
            ax.plot(xs, ys, marker="o", color=color, label=f"target {_deploy_label(d)}")
            _label_points(ax, xs, ys, names, color)
        ax.set_xlabel("latency per call (ms, measured on the target" + (", log scale)" if log_x else ")"))
        if log_x:
            ax.set_xscale("log")
        else:
            ax.set_xlim(left=0)
        ax.set_ylabel(ylabel)
        if ax is axes[0][0]:
            ax.set_ylim(0, 105)
        ax.set_title(title)
        ax.legend(loc="lower right", fontsize=9)
    return _png(fig)


def _first_number(event: dict, keys: tuple[str, ...]) -> float | None:
    for k in keys:
        v = event.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


_STEP_ACC_KEYS = ("search_accuracy", "accuracy", "acc")
_STEP_MACS_KEYS = ("macs_fraction",)


def _step_point(event: dict, full_macs: int) -> tuple[float, float] | None:
    acc = _pct(_first_number(event, _STEP_ACC_KEYS))
    frac = _first_number(event, _STEP_MACS_KEYS)
    if frac is None and (macs := _first_number(event, ("macs",))) is not None and full_macs:
        frac = macs / full_macs
    return None if acc is None or frac is None else (100 * frac, acc)


def _plot_search(plt, data: dict) -> bytes | None:
    full_macs = data["model"]["macs"] or 0
    series = {}
    for method, result in data["search"]["methods"].items():
        steps = [e for e in result.get("history", []) if e.get("event") == "step"]
        pts = [p for p in (_step_point(e, full_macs) for e in steps) if p]
        if len(pts) >= 2:
            series[method] = (result, steps, pts)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7.6, 4.0))
    for i, (method, (result, steps, pts)) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, color=color, marker=".", linewidth=1, label=f"{_method_label(method)}: search steps")
        tuned = [p for e in steps if e.get("finetuned") for p in [_step_point(e, full_macs)] if p]
        history = result.get("history", [])
        for j, e in enumerate(history):  # a fine-tune event marks the step just before it
            if e.get("event") == "finetune":
                prev = next((_step_point(h, full_macs) for h in reversed(history[:j]) if h.get("event") == "step"), None)
                if prev:
                    tuned.append(prev)
        if tuned:
            tx, ty = zip(*tuned)
            ax.scatter(tx, ty, s=80, facecolors="none", edgecolors="#d62728", linewidths=1.5, zorder=3,
                       label="fine-tuned here" if i == len(series) - 1 else None)
    ax.invert_xaxis()  # the search shrinks the model: read left to right
    ax.set_xlabel("MACs, % of the full model (the search shrinks from the left)")
    ax.set_ylabel("accuracy on the search split (%)")
    ax.set_title("Search trajectory: best candidate per step")
    ax.legend(loc="best", fontsize=9)
    return _png(fig)


# ── sections ──

def _figure(name: str, png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return f'<figure><img src="{src}" alt="{_e(alt)}" data-plot="{name}"></figure>'


def _section_header(data: dict) -> str:
    m = data["model"]
    sets = m["sets"]
    free = sum(1 for s in sets if s["groups"] > 1)
    methods = [mm for mm, r in data["search"]["methods"].items() if "error" not in r]
    targets = [_deploy_label(d) for d in data["deployables"] if "error" not in d]
    cards = [
        ("model", f"{_mmacs(m['macs'])} MMACs", f"{_fmt_num(m['params'])} params"),
        ("input", "×".join(map(str, m["input_shape"])), f"{m['trace_mode']} trace"),
        ("channel sets", f"{free} of {len(sets)} slimmable", f"{m['groups']} groups each"),
        ("search", ", ".join(methods) or "not run", ""),
        ("deployables", ", ".join(targets) or "none built", ""),
    ]
    card_html = "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div>'
                        f'<div class="s">{_e(s)}</div></div>' for k, v, s in cards)
    return (f'<header><h1>dyncompile report — {_e(_model_name(m))}</h1>'
            f'<p class="sub">workspace <code>{_e(data["workspace"])}</code> · generated {_e(data["generated"])} '
            f'by dyncompile {_e(data["dyncompile"])}</p><div class="cards">{card_html}</div></header>')


def _subnet_rows(result: dict, full_macs: int) -> list[list[str]]:
    rows = []
    for s in sorted(result["subnets"], key=lambda s: -s["macs"]):
        rows.append([f"<b>{_e(s['name'])}</b>", "—" if s.get("budget") is None else f"{100 * s['budget']:.0f}%",
                     _mmacs(s["macs"]), f"{100 * s['macs'] / full_macs:.1f}%" if full_macs else "—",
                     _fmt_num(s.get("params")), _fmt_acc(s.get("accuracy")), _fmt_acc(s.get("search_accuracy"))])
    return rows


def _comparison(methods: dict, full_macs: int) -> str:
    """Progressive vs US-Nets per requested budget (sub-nets matched by budget, else by rank in MACs)."""
    a, b = methods.get("progressive"), methods.get("usnet")
    if not a or not b or "error" in a or "error" in b:
        return ""

    def keyed(result):
        subs = sorted(result["subnets"], key=lambda s: -s["macs"])
        if all(s.get("budget") is not None for s in subs):
            return {round(s["budget"], 4): s for s in subs}
        return {i: s for i, s in enumerate(subs)}

    ka, kb = keyed(a), keyed(b)
    rows, deltas = [], []
    for key in sorted(set(ka) & set(kb), key=lambda k: -k if isinstance(k, float) else k):
        sa, sb = ka[key], kb[key]
        pa, pb = _pct(sa.get("accuracy")), _pct(sb.get("accuracy"))
        delta = None if pa is None or pb is None else pa - pb
        if delta is not None:
            deltas.append(delta)
        cls = "" if delta is None else ("good" if delta >= 0 else "bad")
        rows.append([f"{100 * key:.0f}%" if isinstance(key, float) else _e(sa["name"]),
                     f"{_e(sa['name'])} · {100 * sa['macs'] / full_macs:.1f}%", _fmt_acc(sa.get("accuracy")),
                     f"{_e(sb['name'])} · {100 * sb['macs'] / full_macs:.1f}%", _fmt_acc(sb.get("accuracy")),
                     "—" if delta is None else f'<span class="{cls}">{delta:+.2f}</span>'])
    if not rows:
        return ""
    mean = f" Mean difference: <b>{sum(deltas) / len(deltas):+.2f}</b> points." if deltas else ""
    return ("<h3>Progressive search vs US-Nets, per budget</h3>"
            + _table(["budget", "progressive: sub-net · MACs", "accuracy", "US-Nets: sub-net · MACs", "accuracy",
                      "Δ points"], rows, cls="compare")
            + f'<p class="hint">Δ = progressive − US-Nets test accuracy.{mean} Differences under ~2 points from a '
              f"single seed are within seed-to-seed noise.</p>")


def _section_subnets(data: dict, figure: str, missing: list[str]) -> str:
    search = data["search"]["methods"]
    full_macs = data["model"]["macs"] or 0
    parts = ['<section id="subnets"><h2>Sub-nets: accuracy vs MACs</h2>']
    if not search:
        line = "no search run yet: run `dyncompile search` (then `dyncompile search --method usnet` for the baseline)"
        missing.append(line)
        return parts[0] + _note(line) + "</section>"
    parts.append(figure)
    for method, result in search.items():
        current = " (current: build uses it)" if data["search"]["current"] == method else ""
        parts.append(f"<h3>{_e(_method_label(method))}{_e(current)}</h3>")
        if "error" in result:
            parts.append(f'<p class="error">{_e(result["error"])}</p>')
            continue
        facts = [f"model as given: {_fmt_acc(result.get('full_accuracy'))}"] if result.get("full_accuracy") is not None else []
        if result.get("wall_s"):
            facts.append(f"run took {_seconds(result['wall_s'])}")
        ds = result.get("data") or {}
        if ds:
            facts.append("data: " + ", ".join(f"{k} {v}" for k, v in ds.items() if isinstance(v, (str, int, float))))
        if facts:
            parts.append(f'<p class="hint">{_e(" · ".join(facts))}</p>')
        parts.append(_table(["sub-net", "budget", "MMACs", "MACs", "params", "test accuracy", "search-split acc."],
                            _subnet_rows(result, full_macs)))
    if "progressive" in search and "usnet" not in search:
        line = "no US-Nets baseline to compare with: run `dyncompile search --method usnet`"
        missing.append(line)
        parts.append(_note(line))
    parts.append(_comparison(search, full_macs))
    return "".join(parts) + "</section>"


def _strip(order: list[int], kept: int, groups: int) -> str:
    """G small boxes in original group order: filled where the sub-net keeps that group."""
    keep = set(order[:kept])
    return '<span class="strip">' + "".join(f'<i class="{"on" if g in keep else "off"}"></i>'
                                             for g in range(groups)) + "</span>"


def _section_widths(data: dict, missing: list[str]) -> str:
    head = '<section id="widths"><h2>Per-layer widths: which channel groups each sub-net keeps</h2>'
    methods = {m: r for m, r in data["search"]["methods"].items() if "error" not in r and r.get("subnets")}
    if not methods:
        line = "no sub-nets chosen yet: run `dyncompile search` to see which groups each keeps"
        missing.append(line)
        return head + _note(line) + "</section>"
    sets = [s for s in data["model"]["sets"] if s["groups"] > 1]
    full_macs = data["model"]["macs"] or 0
    columns = [(m, s) for m, r in methods.items() for s in sorted(r["subnets"], key=lambda s: -s["macs"])]
    method_row = "".join(f'<th colspan="{sum(1 for mm, _ in columns if mm == m)}" class="method">'
                         f"{_e(_method_label(m))}</th>" for m in methods)
    subnet_row = "".join(f'<th class="num">{_e(s["name"])}<br><span class="dim">'
                         f'{100 * s["macs"] / full_macs:.0f}% MACs</span></th>' for _, s in columns)
    body = []
    for st in sets:
        g = st["groups"]
        cells = []
        for method, sub in columns:
            order = methods[method].get("group_order", {}).get(st["name"]) or list(range(g))
            kept = int(sub["config"].get(st["name"], g))
            chans = sum(st["group_channels"][i] for i in order[:kept]) if st["group_channels"] else kept
            frac = kept / g
            title = (f"{st['name']} in {sub['name']}: keeps {kept} of {g} groups "
                     f"({chans} of {sum(st['group_channels']) or st['channels']} channels): groups "
                     f"{', '.join(map(str, sorted(order[:kept])))}")
            cells.append(f'<td class="w" style="background:{_heat(frac)}" title="{_e(title)}">'
                         f'{_strip(order, kept, g)}<span class="n">{chans}</span></td>')
        producers = ", ".join(st["producers"])
        body.append(f'<tr><th class="set" title="{_e("producers: " + producers)}">{_e(st["name"])}</th>'
                    f'<td class="num dim">{st["channels"]}</td>{"".join(cells)}</tr>')
    fixed = [s["name"] for s in data["model"]["sets"] if s["groups"] <= 1]
    fixed_line = (f'<p class="hint">Always at full width (not slimmable): {_e(", ".join(fixed))} — see '
                  f'<a href="#model">why</a>.</p>') if fixed else ""
    return (head + '<p class="hint">One row per slimmable channel set, one column per sub-net. Each cell shows the '
            "set's channel groups in their original order (filled: kept) and the number of channels kept; "
            "darker cells keep more. Hover a cell for the exact groups. Sub-nets are nested: a smaller one keeps a "
            "subset of the groups of every larger one.</p>"
            f'<div class="scroll"><table class="heat"><thead><tr><th rowspan="2">channel set</th>'
            f'<th rowspan="2" class="num">ch.</th>{method_row}</tr><tr>{subnet_row}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>{fixed_line}</section>')


def _heat(frac: float) -> str:
    # light grey-blue (few groups kept) → saturated blue (all kept)
    lo, hi = (241, 245, 250), (147, 187, 230)
    r, g, b = (round(lo[i] + (hi[i] - lo[i]) * frac) for i in range(3))
    return f"rgb({r},{g},{b})"


def _event_durations(history: list[dict]) -> list[float | None]:
    """Seconds each event took: its `duration_s` when it has one, else the time since the previous event.

    `time_s` is seconds since the search started, so it never decreases; a log whose `time_s` does decrease
    is read as per-event durations instead."""
    times = [_first_number(e, ("time_s",)) for e in history]
    explicit = [_first_number(e, ("duration_s", "seconds")) for e in history]
    known = [t for t in times if t is not None]
    stamps = all(a <= b for a, b in zip(known, known[1:]))
    out, last = [], 0.0
    for t, d in zip(times, explicit):
        if d is not None:
            out.append(d)
        elif t is None:
            out.append(None)
        elif stamps:
            out.append(max(0.0, t - last))
        else:
            out.append(t)
        if t is not None:
            last = t
    return out


def _event_detail(event: dict) -> str:
    skip = {"event", "time_s", "duration_s", "seconds"}
    items = []
    for k, v in event.items():
        if k in skip:
            continue
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (list, dict)):
            v = json.dumps(v)
            v = v if len(v) <= 60 else v[:57] + "…"
        items.append(f"{k}={v}")
    return _e(", ".join(items))


def _section_history(data: dict, figure: str, missing: list[str]) -> str:
    head = '<section id="history"><h2>Search history</h2>'
    methods = {m: r for m, r in data["search"]["methods"].items() if "error" not in r}
    if not methods:
        line = "no search history yet: run `dyncompile search`"
        missing.append(line)
        return head + _note(line) + "</section>"
    parts = [head, figure]
    for method, result in methods.items():
        history = result.get("history") or []
        parts.append(f"<h3>{_e(_method_label(method))}</h3>")
        if not history:
            parts.append(_note("this search recorded no history"))
            continue
        durations = _event_durations(history)
        kinds: dict[str, list] = {}
        for e, d in zip(history, durations):
            kinds.setdefault(str(e.get("event", "?")), []).append(d)
        rows = [[_e(EVENT_LABELS.get(k, k)), str(len(ds)),
                 _seconds(sum(d for d in ds if d is not None)) if any(d is not None for d in ds) else "—"]
                for k, ds in kinds.items()]
        rows.append(["<b>whole search</b>", str(len(history)), f"<b>{_seconds(result.get('wall_s'))}</b>"])
        parts.append(_table(["stage", "events", "time"], rows, cls="narrow"))
        opts = result.get("options") or {}
        if opts:
            shown = ", ".join(f"{k}={v}" for k, v in opts.items() if isinstance(v, (str, int, float, bool)) or v is None)
            parts.append(f'<p class="hint">options: {_e(shown)}</p>')
        event_rows = [[str(i), _e(EVENT_LABELS.get(e.get("event"), e.get("event", "?"))),
                       _fmt_num(_first_number(e, ("time_s",)), 4), _event_detail(e)] for i, e in enumerate(history)]
        parts.append(f"<details><summary>all {len(history)} events</summary>"
                     + _table(["#", "event", "time_s", "details"], event_rows, numeric_from=2, cls="events")
                     + "</details>")
    return "".join(parts) + "</section>"


def _target_facts(d: dict) -> str:
    t = d["target"]
    facts = []
    if t.get("mtriple") or t.get("mcpu"):
        facts.append(" ".join(x for x in (t.get("mtriple"), f"mcpu {t['mcpu']}" if t.get("mcpu") else None) if x))
    if t.get("arch"):
        facts.append(f"arch {t['arch']}")
    if t.get("num_cores"):
        facts.append(f"{t['num_cores']} cores")
    tuning = d.get("tuning")
    if not tuning:
        facts.append("untuned (rebuild with --tune-trials N)")
    else:
        kernels = tuning.get("kernels", "?")
        left = tuning.get("left_for_time") or 0
        facts.append(f"tuned: {tuning.get('trials_per_task', '?')} trials per kernel, "
                     + (f"{kernels - left} of {kernels} kernels (time budget)" if left else f"{kernels} kernels"))
    inp = d.get("input") or {}
    if inp.get("shape"):
        facts.append(f"input {'×'.join(map(str, inp['shape']))} {inp.get('dtype', '')}".strip())
    if d.get("weights_bytes"):
        facts.append(f"weights {d['weights_bytes'] / 2**20:.2f} MiB (stored once)")
    versions = d.get("versions") or {}
    if versions.get("tvm"):
        facts.append(f"TVM {versions['tvm']}")
    if d.get("created"):
        facts.append(f"built {d['created']}")
    return " · ".join(facts)


def _section_deploy(data: dict, figure: str, accuracy_of, missing: list[str]) -> str:
    head = '<section id="deploy"><h2>Deployables: latency per target</h2>'
    if not data["deployables"]:
        line = "no deployable built yet: run `dyncompile build --target cpu` (or arm, cuda)"
        missing.append(line)
        return head + _note(line) + "</section>"
    parts = [head, figure]
    full_macs = data["model"]["macs"] or 0
    for d in data["deployables"]:
        name = _deploy_label(d)
        parts.append(f'<h3>target {_e(name)} <span class="dim">— <code>{_e(d["path"])}</code></span></h3>')
        if "error" in d:
            parts.append(f'<p class="error">{_e(d["error"])}</p>')
            continue
        _, stale = _built_from(data, d)
        method = (d.get("search") or {}).get("method")
        origin = (f"sub-nets of the {_method_label(method)}" if method else
                  "sub-nets not from a search (no accuracies to show)")
        parts.append(f'<p class="hint">{_e(origin + " · " + _target_facts(d))}</p>')
        if stale:
            line = (f"target {name} was built from an earlier {_method_label(method)} result: rebuild it with "
                    f"`dyncompile build --target {d['target'].get('name', '?')}`")
            missing.append(line)
            parts.append(_note(line))
        subnets = sorted(d["subnets"], key=lambda s: -s.get("macs", 0))
        timed = [s for s in subnets if s.get("latency_ms")]
        largest = max(timed, key=lambda s: s.get("macs", 0)) if timed else None
        peers = sorted({e for s in subnets for e in (s.get("peer_latency_ms") or {})})
        rows = []
        for s in subnets:
            lat = s.get("latency_ms")
            rel_lat = f"{lat / largest['latency_ms']:.2f}" if lat and largest else "—"
            rel_macs = f"{s['macs'] / largest['macs']:.2f}" if largest and largest.get("macs") else "—"
            tuned = f"{s.get('tuned_kernels', 0)}/{s['kernels']}" if s.get("kernels") else "—"
            rows.append([f"<b>{_e(s['name'])}</b>", _mmacs(s.get("macs")),
                         f"{100 * s['macs'] / full_macs:.1f}%" if full_macs and s.get("macs") else "—",
                         _fmt_num(s.get("params")), _fmt_acc(accuracy_of(d, s)),
                         "—" if not lat else f"<b>{lat:.3f}</b>", rel_lat, rel_macs, tuned,
                         *[c for e in peers for c in _peer_cells(lat, (s.get("peer_latency_ms") or {}).get(e))]])
        parts.append(_table(["sub-net", "MMACs", "MACs", "params", "accuracy", "latency (ms)", "latency ÷ largest",
                             "MACs ÷ largest", "tuned kernels",
                             *[h for e in peers for h in (f"{_e(e)} (ms)", f"latency ÷ {_e(e)}")]], rows))
        how = d.get("latency") or {}
        if timed and how:
            parts.append(f'<p class="hint">latency measured with: '
                         f'{_e(", ".join(f"{k}={v}" for k, v in how.items()))}</p>')
        if not timed:
            line = (f"no latency measured for target {name} yet: run `dyncompile bench {d['path']}` "
                    f"(with `--rpc HOST:PORT` for a board)")
            missing.append(line)
            parts.append(_note(line))
    return "".join(parts) + "</section>"


def _peer_cells(latency: float | None, peer: float | None) -> tuple[str, str]:
    """Another engine's latency for the same sub-net (same bench run) and how the deployable compares: under 1 is
    faster than that engine."""
    if not peer:
        return "—", "—"
    ratio = f"{latency / peer:.2f}" if latency else "—"
    return f"{peer:.3f}", ratio


def _section_model(data: dict) -> str:
    m = data["model"]
    src = m.get("model") or {}
    rows = [
        ["model", f"<code>{_e(src.get('location', '?'))}</code> ({_e(src.get('kind', '?'))})"
                  + (f"<br>architecture <code>{_e(src['arch'])}</code>" if src.get("arch") else "")
                  + (f"<br>SHA-256 {_e(src['sha256'][:16])}…" if src.get("sha256") else "")],
        ["input shape", _e("×".join(map(str, m["input_shape"])) + " (sub-nets are specialised to it; batch free)")],
        ["MACs / params", _e(f"{_mmacs(m['macs'])} M / {_fmt_num(m['params'])}")],
        ["trace", _e(f"{m['trace_mode']}; grouped convs: {m.get('grouped_conv_mode')}")],
        ["groups per set", _e(m["groups"])],
        ["opaque (--leaf)", _e(", ".join(m.get("leaf_modules") or []) or "none")],
        ["converted", _e(f"{m.get('created')} by dyncompile {m.get('dyncompile')}, torch {m.get('torch')}")],
    ]
    kv = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    reasons = m.get("fixed_reasons") or []
    why = ("<h3>Kept at full width, and why</h3><ul>" + "".join(f"<li>{_e(r)}</li>" for r in reasons) + "</ul>"
           if reasons else "")
    set_rows = [[_e(s["name"]), str(s["channels"]), str(s["groups"]) if s["groups"] > 1 else "fixed",
                 _e(" ".join(map(str, s["group_channels"]))) or "—", str(s["fixed_channels"]),
                 _e(", ".join(s["producers"]))] for s in m["sets"]]
    sets = (f"<details><summary>all {len(m['sets'])} channel sets (channels kept or dropped together)</summary>"
            + _table(["set", "channels", "groups", "channels per group", "fixed ch.", "producers"], set_rows,
                     numeric_from=1, cls="sets") + "</details>")
    return (f'<section id="model"><h2>Model and conversion</h2><table class="kv">{kv}</table>{why}{sets}'
            f"</section>")


_CSS = """
:root{--fg:#1d2330;--dim:#6b7383;--line:#e3e7ee;--bg:#fff;--panel:#f6f8fb;--accent:#1f5fa8}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
 "DejaVu Sans",sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
header h1{font-size:24px;margin:0 0 4px}
.sub{color:var(--dim);margin:0 0 16px}
nav{position:sticky;top:0;background:rgba(255,255,255,.95);border-bottom:1px solid var(--line);
 padding:8px 0;margin-bottom:8px;z-index:2}
nav a{margin-right:18px;color:var(--accent);text-decoration:none;font-weight:600}
.cards{display:grid;grid-template-columns:repeat(5,1fr);gap:10px;margin-bottom:10px}
.card{background:var(--panel);border:1px solid var(--line);border-radius:8px;padding:10px 12px}
.card .k{color:var(--dim);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:17px;font-weight:650;margin-top:2px}
.card .s{color:var(--dim);font-size:12px}
section{margin-top:30px}
h2{font-size:19px;border-bottom:2px solid var(--line);padding-bottom:4px;margin:0 0 12px}
h3{font-size:15px;margin:18px 0 6px}
figure{margin:8px 0 12px}
figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:6px}
table{border-collapse:collapse;margin:4px 0 8px;font-size:13px}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:middle}
thead th{background:var(--panel);font-weight:600;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:hover{background:#fafbfd}
table.kv th{color:var(--dim);font-weight:500;width:160px}
table.heat{font-size:12px}
table.heat td.w{padding:3px 6px;white-space:nowrap;border-left:2px solid #fff}
table.heat th.set{font-weight:500;font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;
 white-space:nowrap}
table.heat th.method{text-align:center;border-left:2px solid #fff}
.strip{display:inline-flex;gap:1px;vertical-align:middle;margin-right:4px}
.strip i{display:inline-block;width:6px;height:12px;border-radius:1px}
.strip i.on{background:#1f4e8c}
.strip i.off{background:#fff;outline:1px solid #c9d3e0;outline-offset:-1px}
.w .n{display:inline-block;min-width:1.9em;text-align:right;font-variant-numeric:tabular-nums}
.scroll{overflow-x:auto}
.dim{color:var(--dim);font-weight:400}
.hint{color:var(--dim);font-size:13px;margin:4px 0 8px}
.missing{background:#fff8e6;border-left:4px solid #e0a800;padding:8px 12px;margin:6px 0;border-radius:4px}
.error{background:#fdecec;border-left:4px solid #c62828;padding:8px 12px;border-radius:4px}
.good{color:#1b7f3b;font-weight:600}.bad{color:#c62828;font-weight:600}
code{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12.5px;background:var(--panel);
 padding:1px 4px;border-radius:3px}
details{margin:8px 0}
summary{cursor:pointer;color:var(--accent)}
table.events td:last-child{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:11.5px;text-align:left}
footer{margin-top:40px;color:var(--dim);font-size:12px}
"""


def _page(data: dict, body: str) -> str:
    title = f"dyncompile report — {_model_name(data['model'])}"
    nav = ('<nav><a href="#subnets">Sub-nets</a><a href="#deploy">Latency</a><a href="#widths">Per-layer widths</a>'
           '<a href="#history">Search history</a><a href="#model">Model</a></nav>')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{_e(title)}</title><style>{_CSS}</style></head>'
            f'<body><main>{body.replace("<!--nav-->", nav)}<footer>Made by <code>dyncompile report</code>; the '
            f'plots are also saved beside this file as PNG.</footer></main></body></html>\n')


# ── writing ──

def _built_from(data: dict, deployable: dict) -> tuple[dict | None, bool]:
    """(the search result a deployable's sub-nets come from, whether that result changed since the build)."""
    search = deployable.get("search") or {}
    result = data["search"]["methods"].get(search.get("method"))
    if result is None or "error" in result:
        return None, False
    recorded = search.get("result_sha256")
    return result, bool(recorded and recorded != result.get("result_sha256"))


def _accuracy_lookup(data: dict):
    """Accuracy of a deployed sub-net: the manifest's, else that of the sub-net of the same name in the search
    result the deployable was built from (never another method's: its weights are not the deployed ones)."""

    def accuracy_of(deployable: dict, subnet: dict) -> float | None:
        if subnet.get("accuracy") is not None:
            return subnet["accuracy"]
        result, stale = _built_from(data, deployable)
        if result is None or stale:
            return None
        return next((s.get("accuracy") for s in result.get("subnets", []) if s["name"] == subnet["name"]), None)

    return accuracy_of


def make_report(workspace: str | Path, out_html: str | Path | None = None) -> Report:
    """Write the report of `workspace` to `out_html` (default `<workspace>/report/report.html`) and its plots."""
    data = collect_report(workspace)
    out_html = Path(out_html) if out_html is not None else default_report_path(workspace)
    if out_html.exists() and out_html.is_dir():
        raise DyncompileError(f"'{out_html}' is a folder; give the report a file name, e.g. -o report.html")
    out_html.parent.mkdir(parents=True, exist_ok=True)
    accuracy_of = _accuracy_lookup(data)
    plt = _pyplot()
    pngs: dict[str, bytes | None] = {name: None for name in PLOTS}
    if plt is not None:
        pngs = {"accuracy_macs": _plot_accuracy_macs(plt, data), "latency": _plot_latency(plt, data, accuracy_of),
                "search": _plot_search(plt, data)}
    missing: list[str] = []
    if plt is None:
        missing.append("plots left out: matplotlib is not installed (pip install matplotlib)")
    figures = {name: _figure(name, png, name.replace("_", " ")) for name, png in pngs.items()}
    body = "".join([
        _section_header(data), "<!--nav-->",
        "".join(_note(line) for line in missing),
        _section_subnets(data, figures["accuracy_macs"], missing),
        _section_deploy(data, figures["latency"], accuracy_of, missing),
        _section_widths(data, missing),
        _section_history(data, figures["search"], missing),
        _section_model(data),
    ])
    written = []
    for name, png in pngs.items():
        path = out_html.with_name(f"{out_html.stem}-{PLOTS[name]}.png")
        if png is None:
            path.unlink(missing_ok=True)  # a plot from an earlier report whose data is gone would mislead
            continue
        write_atomic(path, png)
        written.append(path)
    write_atomic(out_html, _page(data, body).encode("utf-8"))
    return Report(html=out_html, plots=tuple(written), missing=tuple(missing))


def write_report(workspace: str | Path, out_html: str | Path | None = None) -> Path:
    """Write the report of `workspace` (see the module docstring); returns the HTML file's path."""
    return make_report(workspace, out_html).html
