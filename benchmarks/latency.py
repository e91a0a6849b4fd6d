"""Latency of every uniform-width sub-net on this CPU: PyTorch eager, ONNX Runtime, TVM untuned, TVM tuned.

For each model, batch size and sub-net the engines run interleaved in one process (blocks of calls taking
turns; `dyncompile.bench.interleaved_medians`), all on the same cores. Prints medians, the ratio to ONNX Runtime,
latency(sub-net)/latency(full) next to MACs(sub-net)/MACs(full), and GFLOP/s; writes everything as JSON.

    nice .venv/bin/python benchmarks/latency.py --tune-trials 32 --tune-models resnet20
    nice .venv/bin/python benchmarks/latency.py --models resnet20 --batches 1 --tune-trials 0   # quick

Tuning uses (and extends) the workspace's database (<workspace>/tuning/cpu), so a second run tunes nothing
new. `--profile` prints where the tuned full-width sub-net spends its time, kernel by kernel (TVM's VM profiler).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Idle worker threads sleep instead of spinning (set before torch and TVM load): on a shared 2-core machine
# a spinning pool of one engine steals the cores of the next one in the interleaved loop (seen: eager PyTorch
# 60x slower right after a TVM call).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dyncompile import runtime  # noqa: E402
from dyncompile.bench import interleaved_medians, kernel_times, onnx_runner, torch_runner  # noqa: E402
from dyncompile.build import build, tuning_dir_for, uniform_subnets  # noqa: E402
from dyncompile.deployable import write_deployable  # noqa: E402
from dyncompile.passes.extract import extract_subnet  # noqa: E402
from dyncompile.pipeline import analyse_model  # noqa: E402
from dyncompile.zoo import ZOO  # noqa: E402
from dyncompile.zoo import build as build_zoo_model  # noqa: E402

MODELS = {"resnet20": "resnet20-cifar", "mobilenetv2": "mobilenetv2-imagenet"}
ENGINES = ("eager", "ort", "tvm_untuned", "tvm_tuned")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _profile(model: runtime.LocalModel, name: str, x: np.ndarray, top: int = 8, calls: int = 20) -> dict:
    """Where one call of `name` spends its time: per kernel (VM call instructions timed with an instrument),
    and the rest (VM interpretation, allocation) as the wall time minus the kernels' sum."""
    import tvm

    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(model.path / "model.so")), tvm.cpu())
    args = [tvm.runtime.tensor(x), *model.weights_of(name)]
    vm[name](*args)  # warm-up
    start = time.perf_counter()
    for _ in range(calls):
        vm[name](*args)
    wall_us = (time.perf_counter() - start) / calls * 1e6
    kernels = [{"kernel": k, "us": us} for k, us in kernel_times(vm, name, args, calls=calls)]
    in_kernels = sum(r["us"] for r in kernels)
    return {"wall_us": wall_us, "kernels_us": in_kernels, "kernels": len(kernels), "top": kernels[:top]}


def bench_model(key: str, batches: list[int], tune_trials: int, tune_batches: set[int], repeats: int,
                workspace: Path, profile: bool, budget_s: float) -> list[dict]:
    entry = ZOO[MODELS[key]]
    torch.manual_seed(0)
    model = build_zoo_model(entry.name).eval()
    dg = analyse_model(model, entry.input_shape, groups=8)
    subnets = uniform_subnets(dg)
    rows = []
    for batch in batches:
        with tempfile.TemporaryDirectory(prefix="dyncompile-latency-") as tmp:
            loaded = {}
            for kind, trials in (("tvm_untuned", 0), ("tvm_tuned", tune_trials if batch in tune_batches else 0)):
                if kind == "tvm_tuned" and not trials:
                    continue
                start = time.perf_counter()
                result = build(dg, subnets, target="cpu", batch_size=batch, tune_trials=trials,
                               tuning_dir=tuning_dir_for(workspace, "cpu") if trials else None,
                               progress=(lambda stage, msg: _log(f"{key} b{batch} {kind}: {stage} {msg}"))
                               if trials else None)
                _log(f"{key} batch {batch}: {kind} built in {time.perf_counter() - start:.0f} s"
                     + (f" (tuning: {result.tuning.tasks} kernels, {result.tuning.tuned} tuned now, "
                        f"{result.tuning.reused} reused, {result.tuning.seconds:.0f} s)" if result.tuning else ""))
                loaded[kind] = runtime.load(write_deployable(Path(tmp) / kind, result, dg))
                if kind == "tvm_tuned":
                    tuned_counts = {s.name: (s.tuned_kernels, s.kernels) for s in result.subnets}
            x = np.random.default_rng(0).standard_normal((batch, *entry.input_shape[1:])).astype(np.float32)
            for name, config in subnets.items():
                sub = extract_subnet(dg, config).eval()
                macs = next(s.macs for s in loaded["tvm_untuned"].subnets if s.name == name)
                calls = {"eager": torch_runner(sub, x), "ort": onnx_runner(sub, x)}
                for kind, m in loaded.items():
                    calls[kind] = m.prepared(name, x)
                with torch.no_grad():
                    expected = sub(torch.from_numpy(x)).numpy()
                errors = {kind: float(np.abs(m.run(x, subnet=name) - expected).max()) for kind, m in loaded.items()}
                # one call each for an estimate, then as many repeats as fit the time budget (at least 5)
                estimate = interleaved_medians(calls, repeats=1, warmup=1, block=1)
                n = int(max(5, min(repeats, budget_s * 1e3 / max(1e-3, sum(estimate.values())))))
                medians = interleaved_medians(calls, repeats=n, warmup=2)
                row = {"model": key, "input": list(entry.input_shape[1:]), "batch": batch, "subnet": name,
                       "macs_per_image": macs, "repeats": n, "ms": medians, "max_error_vs_eager": errors}
                if "tvm_tuned" in loaded:
                    row["tuned_kernels"] = list(tuned_counts[name])
                rows.append(row)
                _log(f"{key} b{batch} {name}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in medians.items()))
            if profile and "tvm_tuned" in loaded:
                full = next(iter(subnets))
                rows[-len(subnets)]["profile_tvm_tuned"] = _profile(loaded["tvm_tuned"], full, x)
    full_ms = {}
    for r in rows:
        if r["subnet"] == next(iter(subnets)):
            full_ms[(r["model"], r["batch"])] = (r["ms"], r["macs_per_image"])
    for r in rows:
        ms_full, macs_full = full_ms[(r["model"], r["batch"])]
        r["macs_fraction"] = r["macs_per_image"] / macs_full
        r["latency_fraction"] = {k: v / ms_full[k] for k, v in r["ms"].items()}
        r["ratio_to_ort"] = {k: v / r["ms"]["ort"] for k, v in r["ms"].items()}
        r["gflops"] = {k: 2 * r["macs_per_image"] * r["batch"] / (v * 1e6) for k, v in r["ms"].items()}
    return rows


def markdown(rows: list[dict]) -> str:
    engines = [e for e in ENGINES if any(e in r["ms"] for r in rows)]
    head = ["model", "batch", "sub-net", "MMACs/img", "MACs frac"] + [f"{e} ms" for e in engines] \
        + [f"{e}/ORT" for e in engines if e.startswith("tvm")] + [f"lat frac {e}" for e in engines] \
        + [f"GFLOP/s {e}" for e in engines]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cell = lambda d, e, fmt: fmt.format(d[e]) if e in d else "–"  # noqa: E731
        lines.append("| " + " | ".join(
            [r["model"], str(r["batch"]), r["subnet"], f"{r['macs_per_image'] / 1e6:.1f}", f"{r['macs_fraction']:.3f}"]
            + [cell(r["ms"], e, "{:.3f}") for e in engines]
            + [cell(r["ratio_to_ort"], e, "{:.2f}") for e in engines if e.startswith("tvm")]
            + [cell(r["latency_fraction"], e, "{:.3f}") for e in engines]
            + [cell(r["gflops"], e, "{:.1f}") for e in engines]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet20,mobilenetv2", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--tune-trials", type=int, default=32, help="MetaSchedule trials per distinct kernel")
    parser.add_argument("--tune-models", default="resnet20", help="models to tune (others: untuned TVM only)")
    parser.add_argument("--tune-batches", default="1,8", help="batch sizes to tune (others: untuned TVM only)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per engine and sub-net (at most)")
    parser.add_argument("--budget-s", type=float, default=6.0, help="time per sub-net's timing, bounds repeats")
    parser.add_argument("--workspace", type=Path, default=Path("dyncompile-workspace"),
                        help="its tuning/cpu database is used and extended")
    parser.add_argument("--profile", action="store_true", help="per-kernel profile of tuned full-width sub-nets")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "latency.json")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    rows = []
    tune_models = {m for m in args.tune_models.split(",") if m}
    for key in [m for m in args.models.split(",") if m]:
        tune_batches = {int(b) for b in args.tune_batches.split(",") if b} if key in tune_models else set()
        rows += bench_model(key, [int(b) for b in args.batches.split(",")], args.tune_trials, tune_batches,
                            args.repeats, args.workspace, args.profile, args.budget_s)
    table = markdown(rows)
    print(table)
    for r in rows:
        p = r.get("profile_tvm_tuned")
        if p:
            print(f"\nprofile {r['model']} b{r['batch']} {r['subnet']} (tvm_tuned, instrumented): wall {p['wall_us']:.0f} us, "
                  f"{p['kernels']} kernels {p['kernels_us']:.0f} us")
            for k in p["top"]:
                print(f"  {k['kernel']}: {k['us']:.0f} us")
    args.json.write_text(json.dumps({"command": " ".join(sys.argv), "threads": threads,
                                     "cpu": __import__("tvm").target.codegen.llvm_get_system_cpu(),
                                     "rows": rows}, indent=1))
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
