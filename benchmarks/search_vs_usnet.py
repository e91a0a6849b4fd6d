"""Progressive sub-network search vs the US-Nets baseline, on real Fashion-MNIST (issue 3's evidence).

    python benchmarks/search_vs_usnet.py --seeds 0,1,2 --train-limit 10000 --epochs 3

1. Trains the in-repo ResNet-20 (1×28×28, `dyncompile.zoo.resnet:resnet20_fashion`) at full width once, and
   converts it (`dyncompile convert ... --groups 8`): both methods start from this same trained model.
2. For every seed, runs `--method usnet` and `--method progressive` on a fresh copy of that workspace with the
   same data subset, epochs, optimizer and seed (the progressive run also spends its noise-ranking pass and
   fine-tunes, which the wall time column shows).
3. Prints, per requested budget, each method's measured MACs fraction and test accuracy (mean ± std over the
   seeds), the difference, and wall times; writes everything to JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dyncompile.data import loader, open_dataset  # noqa: E402
from dyncompile.search.run import SearchOptions, SearchRun  # noqa: E402
from dyncompile.ir import uniform_config  # noqa: E402
from dyncompile.search.train import cosine_lr, make_optimizer  # noqa: E402
from dyncompile.search.usnet import uniform_widths  # noqa: E402
from dyncompile.zoo.resnet import resnet20_fashion  # noqa: E402

INPUT_SHAPE = (1, 1, 28, 28)


def train_full_model(path: Path, *, train_limit: int, epochs: int, batch_size: int, lr: float, seed: int) -> dict:
    """Plain full-width training (the user's 'already trained' model); returns its test accuracy and time."""
    torch.manual_seed(seed)
    model = resnet20_fashion()
    splits = open_dataset("fashion-mnist", input_shape=INPUT_SHAPE, train_limit=train_limit, seed=seed)
    optimizer = make_optimizer(dict(model.named_parameters()), lr=lr)
    steps_per_epoch = math.ceil(len(splits.train) / batch_size)
    total, step, start = epochs * steps_per_epoch, 0, time.time()
    model.train()
    for epoch in range(epochs):
        for x, y in loader(splits.train, batch_size, shuffle=True, seed=seed, epoch=epoch):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, step, total)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            step += 1
        print(f"  full-width training: epoch {epoch + 1}/{epochs} done ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for x, y in loader(splits.test, 500, shuffle=False):
            correct += int((model(x).argmax(1) == y).sum())
            seen += len(y)
    torch.save(model.state_dict(), path)
    return {"test_accuracy": correct / seen, "seconds": round(time.time() - start, 1), "epochs": epochs}


def convert(state_dict: Path, workspace: Path, groups: int) -> None:
    cmd = [sys.executable, "-m", "dyncompile", "convert", str(state_dict), "--arch",
           "dyncompile.zoo.resnet:resnet20_fashion", "--input-shape", ",".join(map(str, INPUT_SHAPE)),
           "--groups", str(groups), "--workspace", str(workspace), "--json"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def run_method(base: Path, work: Path, method: str, seed: int, args) -> dict:
    ws = work / f"{method}-seed{seed}"
    shutil.rmtree(ws, ignore_errors=True)
    shutil.copytree(base, ws)
    options = SearchOptions(method=method, seed=seed, epochs=args.epochs, train_limit=args.train_limit,
                            val_limit=args.val_limit, subnets=tuple(args.subnets), batch_size=args.batch_size,
                            lr=args.lr, train_full=0, rank=args.rank, rank_direction=args.rank_direction,
                            joint_pool=args.joint_pool, budget_window=args.budget_window,
                            search_limit=args.search_limit)
    last = {"t": 0.0}

    def progress(kind, **info):
        if kind == "event" and info["event"] in ("step", "finetune", "rank", "select", "usnet-train", "joint-train"):
            if info["event"] != "step" or info["time_s"] - last["t"] > 30:
                last["t"] = info["time_s"]
                print(f"    [{method} seed {seed}] {json.dumps({k: v for k, v in info.items() if k not in ('scores', 'order', 'chosen')})[:160]}",
                      flush=True)

    start = time.time()
    run = SearchRun(ws, options, progress=progress)
    result = run.run()
    wall = time.time() - start
    finetunes = [e for e in result.history if e["event"] == "finetune"]
    record = {"method": method, "seed": seed, "wall_s": round(wall, 1), "finetunes": len(finetunes),
              "subnets": {f"{s.budget:g}": {"macs_fraction": s.macs_fraction, "accuracy": s.accuracy,
                                            "config": s.config} for s in result.subnets}}
    if method == "usnet":
        # US-Nets can run any uniform width: measure them all (own BN calibration each), so that progressive's
        # picks can also be compared with US-Nets at the same MACs (interpolated between neighbouring widths).
        record["curve"] = []
        for w in uniform_widths(run.dg, options.min_width):
            rec, _ = run.record(f"w{w:g}", uniform_config(run.dg, w), None)
            record["curve"].append({"width": w, "macs_fraction": rec.macs_fraction, "accuracy": rec.accuracy})
    return record


def usnet_at(curve: list[dict], macs_fraction: float) -> float | None:
    """US-Nets accuracy at a MACs fraction, linear between its two neighbouring widths (None outside them)."""
    points = sorted((c["macs_fraction"], c["accuracy"]) for c in curve)
    for (m0, a0), (m1, a1) in zip(points, points[1:]):
        if m0 - 1e-9 <= macs_fraction <= m1 + 1e-9:
            return a0 + (a1 - a0) * (macs_fraction - m0) / (m1 - m0) if m1 > m0 else a1
    return None


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(runs: list[dict], budgets: list[float]) -> list[dict]:
    rows = []
    for b in budgets:
        key = f"{b:g}"
        row = {"budget": b}
        for method in ("usnet", "progressive"):
            rs = [r for r in runs if r["method"] == method]
            row[method] = {"accuracy": _mean_std([r["subnets"][key]["accuracy"] for r in rs]),
                           "macs_fraction": _mean_std([r["subnets"][key]["macs_fraction"] for r in rs]),
                           "per_seed": [r["subnets"][key]["accuracy"] for r in rs]}
        row["difference"] = row["progressive"]["accuracy"][0] - row["usnet"]["accuracy"][0]
        # Paired by seed: progressive's pick against the same seed's US-Nets at exactly that MACs fraction.
        matched = []
        for pr in (r for r in runs if r["method"] == "progressive"):
            us = next((r for r in runs if r["method"] == "usnet" and r["seed"] == pr["seed"] and "curve" in r), None)
            at = usnet_at(us["curve"], pr["subnets"][key]["macs_fraction"]) if us else None
            if at is not None:
                matched.append(pr["subnets"][key]["accuracy"] - at)
        row["matched_difference"] = _mean_std(matched) if matched else None
        row["matched_per_seed"] = matched
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--val-limit", type=int, default=None, help="test images (default: all 10,000)")
    p.add_argument("--epochs", type=float, default=3.0, help="multi-sub-net training epochs (both methods)")
    p.add_argument("--full-epochs", type=int, default=5, help="full-width training of the shared starting model")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--subnets", default="0.1,0.25,0.5,1.0")
    p.add_argument("--rank", default="noise")
    p.add_argument("--rank-direction", default="tolerant-first")
    p.add_argument("--search-limit", type=int, default=None, help="images in the search split (default: 10%% "
                   "of the training subset)")
    p.add_argument("--joint-pool", default="chosen")
    p.add_argument("--budget-window", default="under")
    p.add_argument("--methods", default="usnet,progressive")
    p.add_argument("--work", type=Path, default=Path("/tmp/dyncompile-bench-search"))
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process with "
                   "torch threads = cores / jobs (seeds and methods are independent)")
    p.add_argument("--reuse", action="store_true", help="reuse the trained full model and workspace in --work")
    p.add_argument("--single", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "search_vs_usnet.json")
    args = p.parse_args()
    args.subnets = [float(b) for b in args.subnets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    base, weights = args.work / "base-workspace", args.work / "full.pt"
    if args.single:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        method, seed = args.single[0], int(args.single[1])
        record = run_method(base, args.work, method, seed, args)
        (args.work / f"{method}-seed{seed}.json").write_text(json.dumps(record))
        return

    full_record = args.work / "full.json"
    if args.reuse and full_record.exists() and (base / "workspace.json").exists():
        full = json.loads(full_record.read_text())
        print(f"1. reusing the trained full model in {args.work}", flush=True)
    else:
        print(f"1. training the shared full model ({args.full_epochs} epochs, {args.train_limit} images)", flush=True)
        full = train_full_model(weights, train_limit=args.train_limit, epochs=args.full_epochs,
                                batch_size=args.batch_size, lr=0.1, seed=0)
        shutil.rmtree(base, ignore_errors=True)
        convert(weights, base, args.groups)
        full_record.write_text(json.dumps(full))
    print(f"   full model: {100 * full['test_accuracy']:.2f}% test accuracy ({full['seconds']:.0f} s to train)", flush=True)

    # The long runs (progressive) first, so that the short ones fill the gaps at the end.
    jobs = sorted(((m, s) for s in seeds for m in args.methods.split(",")), key=lambda j: (j[0] != "progressive", j[1]))
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    passthrough = [a for a in sys.argv[1:] if a != "--reuse"]
    running: list[tuple[subprocess.Popen, str, int]] = []
    runs = []
    print(f"2. {len(jobs)} runs, {args.jobs} at a time, {threads} torch thread(s) each", flush=True)
    while jobs or running:
        while jobs and len(running) < args.jobs:
            method, seed = jobs.pop(0)
            cmd = [sys.executable, __file__, *passthrough, "--single", method, str(seed)]
            running.append((subprocess.Popen(cmd, env={**os.environ, "BENCH_THREADS": str(threads)}), method, seed))
        time.sleep(2)
        for proc, method, seed in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, method, seed))
            if proc.returncode != 0:
                raise SystemExit(f"{method} seed {seed} failed (exit {proc.returncode})")
            r = json.loads((args.work / f"{method}-seed{seed}.json").read_text())
            runs.append(r)
            print(f"   {method} seed {seed}: " + ", ".join(f"{b}: {100 * s['accuracy']:.2f}% @ {100 * s['macs_fraction']:.1f}% MACs"
                                                         for b, s in r["subnets"].items()) + f" ({r['wall_s']:.0f} s)", flush=True)
    runs.sort(key=lambda r: (r["seed"], r["method"]))

    rows = table(runs, args.subnets)
    print()
    print(f"ResNet-20 on Fashion-MNIST ({args.train_limit} training images, full test set"
          f"{'' if args.val_limit is None else f' cut to {args.val_limit}'}), groups {args.groups}, "
          f"{args.epochs:g} epochs, seeds {args.seeds}; mean ± std over seeds")
    print(f"{'budget':>7} | {'US-Nets MACs':>12} | {'US-Nets acc':>14} | {'prog. MACs':>10} | {'progressive acc':>15} | "
          f"{'diff':>6} | {'diff at prog. MACs':>18}")
    for row in rows:
        u, pr, m = row["usnet"], row["progressive"], row["matched_difference"]
        matched = f"{100 * m[0]:+6.2f} ± {100 * m[1]:4.2f}" if m else "n/a"
        print(f"{100 * row['budget']:6.0f}% | {100 * u['macs_fraction'][0]:11.1f}% | {100 * u['accuracy'][0]:7.2f} ± {100 * u['accuracy'][1]:4.2f} | "
              f"{100 * pr['macs_fraction'][0]:9.1f}% | {100 * pr['accuracy'][0]:8.2f} ± {100 * pr['accuracy'][1]:4.2f} | "
              f"{100 * row['difference']:+6.2f} | {matched:>18}")
    print("diff at prog. MACs: progressive minus the same seed's US-Nets interpolated to progressive's MACs "
          "(between its two neighbouring uniform widths; n/a below its smallest width)")
    for method in ("usnet", "progressive"):
        walls = [r["wall_s"] for r in runs if r["method"] == method]
        if walls:
            print(f"wall time {method}: {statistics.mean(walls):.0f} s per seed")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(sys.argv), "full_model": full, "runs": runs, "table": rows,
              "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
