"""TVM deployable against ONNX Runtime, sub-net by sub-net, with the goals of issue 11 checked per row.

For each model and batch size, every uniform width (1.0/0.75/0.5/0.25) is built into one deployable exactly as
`dyncompile build --target cpu` builds it (the default: no tuning; `--tune-trials`/`--tune-minutes` add tuning),
loaded with `dyncompile.runtime.load`, and timed side by side with ONNX Runtime on the same sub-net in one process
(`dyncompile.bench.interleaved_medians`: turns of 20 calls, each engine with its own default thread settings).

Per row: ms, TVM ÷ ORT, GFLOP/s and % of the CPU's FP32 peak for both engines, latency(sub-net) ÷ latency(full)
beside MACs(sub-net) ÷ MACs(full), and which goals hold:
    ratio   TVM ≤ ONNX Runtime, and ≤ 0.6× it for sub-nets under 25% of the MACs
    scale   latency fraction ≤ 2 × MACs fraction, or within 0.05 ms of it
Every output is checked against PyTorch (max error printed; the run fails above 1e-4).

    .venv/bin/python benchmarks/latency.py                                   # all models, batch 1 and 8
    .venv/bin/python benchmarks/latency.py --models resnet20-fashion --batches 1 --layout nchw   # the old layout
    .venv/bin/python benchmarks/latency.py --models resnet18-tiny-224 --batches 1 --group-multiple 16
    .venv/bin/python benchmarks/latency.py --models resnet20-cifar --tune-minutes 10 --workspace /tmp/ws
    .venv/bin/python benchmarks/latency.py --models search:WORKSPACE --batches 1   # a search's chosen sub-nets
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dyncompile import runtime  # noqa: E402
from dyncompile.bench import interleaved_medians, onnx_runner  # noqa: E402
from dyncompile.build import build, tuning_dir_for, uniform_subnets  # noqa: E402
from dyncompile.subnet_choice import subnets_from_workspace  # noqa: E402
from dyncompile.workspace import load_workspace  # noqa: E402
from dyncompile.deployable import write_deployable  # noqa: E402
from dyncompile.passes.extract import extract_subnet  # noqa: E402
from dyncompile.pipeline import analyse_model  # noqa: E402
from dyncompile.targets import pipeline  # noqa: E402
from dyncompile.targets.llvm_common import physical_cores  # noqa: E402
from dyncompile.zoo import ZOO  # noqa: E402
from dyncompile.zoo import build as build_zoo_model  # noqa: E402
from dyncompile.zoo.resnet import resnet18, resnet20_fashion  # noqa: E402

# name -> (factory, input shape)
MODELS = {
    "resnet20-cifar": (lambda: build_zoo_model("resnet20-cifar"), ZOO["resnet20-cifar"].input_shape),
    "resnet20-fashion": (resnet20_fashion, (1, 1, 28, 28)),
    "mobilenetv2-224": (lambda: build_zoo_model("mobilenetv2-imagenet"), ZOO["mobilenetv2-imagenet"].input_shape),
    "resnet18-tiny-224": (lambda: build_zoo_model("resnet18-imagenet"), ZOO["resnet18-imagenet"].input_shape),
    "resnet18-224": (resnet18, (1, 3, 224, 224)),  # real widths: 1.8 GMACs
}
SEARCHED = "search:"  # --models search:WORKSPACE: the sub-nets `dyncompile search` chose in that workspace
PEAK_GFLOPS = 237.0  # this machine: 2 cores × 32 FP32 FLOP/cycle (one 512-bit FMA) × ~3.7 GHz; --peak-gflops


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def goals(macs_fraction: float, latency_fraction: float, tvm_ms: float, ort_ms: float,
          full_tvm_ms: float) -> dict[str, bool]:
    ratio_goal = 0.6 if macs_fraction < 0.25 else 1.0
    return {"ratio": tvm_ms / ort_ms <= ratio_goal,
            "scale": latency_fraction <= 2 * macs_fraction or tvm_ms - 2 * macs_fraction * full_tvm_ms <= 0.05}


def model_subnets(key: str, args: argparse.Namespace):
    """(graph, sub-nets, per-sub-net BN statistics, the PyTorch reference of a sub-net) for a model key:
    a zoo model's uniform widths, or `search:WORKSPACE`, the sub-nets a search chose (non-uniform widths)."""
    if key.startswith(SEARCHED):
        source = subnets_from_workspace(key[len(SEARCHED):], load_workspace(key[len(SEARCHED):]).dg)
        if source.search is None:
            raise SystemExit(f"'{key[len(SEARCHED):]}' holds no search result (run `dyncompile search` on it)")
        return (source.dg, source.configs, source.own_tensors,
                lambda name, config: extract_subnet(source.reference_graph(name), config).eval())
    factory, input_shape = MODELS[key]
    torch.manual_seed(0)
    model = factory().eval()
    dg = analyse_model(model, input_shape, groups=8, group_multiple=args.group_multiple)
    return dg, uniform_subnets(dg), {}, lambda name, config: extract_subnet(dg, config).eval()


def bench_model(key: str, batch: int, args: argparse.Namespace) -> list[dict]:
    dg, subnets, own_tensors, reference = model_subnets(key, args)
    input_shape = dg.input_shape
    tuned = bool(args.tune_trials or args.tune_minutes)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dyncompile-latency-") as tmp:
        result = build(dg, subnets, target="cpu", batch_size=batch, layout=args.layout, own_tensors=own_tensors,
                       tune_trials=args.tune_trials or (64 if args.tune_minutes else 0), tune_minutes=args.tune_minutes,
                       tuning_dir=(tuning_dir_for(args.workspace / f"{Path(key).name}-b{batch}", "cpu")
                                   if tuned else None))
        build_s = time.perf_counter() - start
        _log(f"{key} batch {batch}: built in {build_s:.0f} s"
             + (f" (tuning {result.tuning.seconds:.0f} s, {result.tuning.tasks} kernels)" if result.tuning else ""))
        model_tvm = runtime.load(write_deployable(Path(tmp) / "deploy", result, dg))
        x = np.random.default_rng(0).standard_normal((batch, *input_shape[1:])).astype(np.float32)
        rows = []
        for name, config in subnets.items():
            sub = reference(name, config)
            with torch.no_grad():
                expected = sub(torch.from_numpy(x)).numpy()
            error = float(np.abs(model_tvm.run(x, subnet=name) - expected).max())
            if error > 1e-4:
                raise SystemExit(f"{key} b{batch} {name}: TVM output differs from PyTorch by {error:.2g}")
            medians = interleaved_medians({"tvm": model_tvm.prepared(name, x), "ort": onnx_runner(sub, x)},
                                          repeats=args.repeats)
            macs = next(s.macs for s in result.subnets if s.name == name)
            rows.append({"model": key, "batch": batch, "subnet": name, "macs_per_image": macs, "ms": medians,
                         "tvm_threads": model_tvm.threads,  # the thread guard's count after the timing (None: off)
                         "max_error": error, "build_s": build_s,
                         "tuning_s": result.tuning.seconds if result.tuning else 0.0})
            _log(f"{key} b{batch} {name}: TVM {medians['tvm']:.3f} ms, ORT {medians['ort']:.3f} ms")
        model_tvm.close()
    full = rows[0]
    for r in rows:
        r["macs_fraction"] = r["macs_per_image"] / full["macs_per_image"]
        r["latency_fraction"] = r["ms"]["tvm"] / full["ms"]["tvm"]
        r["gflops"] = {k: 2 * r["macs_per_image"] * batch / (v * 1e6) for k, v in r["ms"].items()}
        r["goals"] = goals(r["macs_fraction"], r["latency_fraction"], r["ms"]["tvm"], r["ms"]["ort"],
                           full["ms"]["tvm"])
    return rows


def markdown(rows: list[dict], peak: float) -> str:
    head = ["model", "batch", "sub-net", "MACs frac", "TVM ms", "ORT ms", "TVM ÷ ORT", "TVM GFLOP/s (% peak)",
            "ORT GFLOP/s (% peak)", "lat frac TVM", "ratio goal", "scale goal", "TVM threads"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        g = r["gflops"]
        lines.append("| " + " | ".join([
            r["model"], str(r["batch"]), r["subnet"], f"{r['macs_fraction']:.3f}", f"{r['ms']['tvm']:.3f}",
            f"{r['ms']['ort']:.3f}", f"{r['ms']['tvm'] / r['ms']['ort']:.2f}",
            f"{g['tvm']:.0f} ({100 * g['tvm'] / peak:.0f}%)", f"{g['ort']:.0f} ({100 * g['ort'] / peak:.0f}%)",
            f"{r['latency_fraction']:.3f}",
            "yes" if r["goals"]["ratio"] else "**no**", "yes" if r["goals"]["scale"] else "**no**",
            str(r["tvm_threads"])]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"of {', '.join(MODELS)}, or {SEARCHED}WORKSPACE "
                        "(the sub-nets a search chose there)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule trials per kernel (default: none)")
    parser.add_argument("--tune-minutes", type=float, default=None, help="cap on tuning time per build")
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/dyncompile-latency"),
                        help="holds the tuning databases (<workspace>/<model>/tuning/cpu)")
    parser.add_argument("--layout", default="blocked", choices=pipeline.LAYOUTS)
    parser.add_argument("--group-multiple", type=int, default=1, help="channel groups sized to this multiple "
                                                                     "(convert --group-multiple)")
    parser.add_argument("--repeats", type=int, default=100, help="timed calls per engine and sub-net")
    parser.add_argument("--peak-gflops", type=float, default=PEAK_GFLOPS)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--rows-to", type=Path, default=None, help=argparse.SUPPRESS)  # one child's rows
    args = parser.parse_args()
    if args.rows_to:  # a child: one model, one batch size, in a process of its own
        args.rows_to.write_text(json.dumps(bench_model(args.models, int(args.batches), args)))
        return
    rows = []
    for key in [m for m in args.models.split(",") if m]:
        if key not in MODELS and not key.startswith(SEARCHED):
            raise SystemExit(f"unknown model '{key}'; models: {', '.join(MODELS)}, or {SEARCHED}WORKSPACE")
        for batch in [int(b) for b in args.batches.split(",")]:
            # each model in a fresh process, as a user runs one: nothing left over from the last model's engines
            with tempfile.TemporaryDirectory() as tmp:
                child = [a for a in sys.argv[1:]]
                child += ["--models", key, "--batches", str(batch), "--rows-to", f"{tmp}/rows.json"]
                subprocess.run([sys.executable, __file__, *child], check=True)
                rows += json.loads(Path(f"{tmp}/rows.json").read_text())
    print(f"\nbatch rows: TVM as `dyncompile build --target cpu` builds it (layout {args.layout}, "
          f"{'tuned' if args.tune_trials or args.tune_minutes else 'untuned default schedules'}); ONNX Runtime "
          f"1 session per sub-net, CPU provider, {physical_cores()} intra-op threads, its other defaults; "
          f"best turn's median of {args.repeats} calls each")
    print(markdown(rows, args.peak_gflops))
    over = [r for r in rows if max(r["gflops"].values()) > args.peak_gflops]
    if over:  # the constant is one machine's; an SGEMM is no yardstick either (MKL runs slow paths on AMD CPUs)
        print(f"\n% peak is of {args.peak_gflops:.0f} GFLOP/s, and {len(over)} rows run faster: that is not this "
              f"CPU's peak; pass --peak-gflops (cores x FP32 FLOP/cycle x GHz) for it")
    failed = [f"{r['model']} b{r['batch']} {r['subnet']}" for r in rows if not all(r["goals"].values())]
    print(f"\ngoals met in {len(rows) - len(failed)} of {len(rows)} rows" + (f"; not in: {', '.join(failed)}"
                                                                            if failed else ""))
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
