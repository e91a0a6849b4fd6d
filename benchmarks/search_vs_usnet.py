"""Progressive sub-network search vs the US-Nets baseline, on real Fashion-MNIST (issues 3 and 13).

    python benchmarks/search_vs_usnet.py --seeds 0,1,2 --train-limit 10000 --epochs 3 \
        --methods usnet,usnet+l1,progressive --usnet-lrs 0.005,0.01,0.02,0.05 --usnet-compute equal

1. Trains an in-repo network for 1×28×28 (`--model`: ResNet-20 `dyncompile.zoo.resnet:resnet20_fashion`, the
   MobileNetV2-style `mobilenet_v2:mobilenet_v2_fashion` or the VGG-style `vgg:vgg8_bn_fashion`) at full width once
   (`--base-seed`: a second, independently trained base model is a second invocation with another seed and
   `--work`), and converts it (`--groups 8`): every method starts from this same trained model.
2. Method variants: `usnet` (published recipe, convert's channel order), `usnet+l1` / `usnet+noise` (US-Nets after
   the same channel ranking the progressive search does), `progressive`, `progressive+l1`, `progressive+none`,
   `progressive+lazy` (the lazy greedy step, issue 14: the default since the fourth session, so the same as
   `progressive` now); `+field=value` sets any `SearchOptions` field (`progressive+greedy=exhaustive`, the paper's
   step; `progressive+finetune_check_images=1024`; `usnet+epochs=1`: US-Nets at the same epochs, for wall time).
3. `--usnet-lrs`: US-Nets' learning rate is chosen per variant on the *search split* (seed 0, mean accuracy of
   its chosen sub-nets), from that sweep; `--usnet-compute equal` trains US-Nets for as many epochs as give it
   the training compute (forward GMACs of every sub-net pass, logged by the runs) the progressive run spent in
   all its phases, seed by seed; `same-epochs` uses `--epochs`.
4. Prints, per requested budget (a cap), each variant's MACs and test accuracy (mean ± std over the seeds), the
   difference to US-Nets at the budget, and to US-Nets' Pareto envelope (its best uniform width at or under
   progressive's MACs, test accuracy: an upper bound for the baseline); training compute and wall times.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
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

INPUT_SHAPE = (1, 1, 28, 28)
MODELS = {  # --model: (name in the tables, factory) — all take 1×28×28 Fashion-MNIST images
    "resnet20": ("ResNet-20", "dyncompile.zoo.resnet:resnet20_fashion"),
    "mobilenetv2": ("MobileNetV2-style", "dyncompile.zoo.mobilenet_v2:mobilenet_v2_fashion"),
    "vgg": ("VGG-style", "dyncompile.zoo.vgg:vgg8_bn_fashion"),
}


def train_full_model(path: Path, factory: str, *, train_limit: int, epochs: int, batch_size: int, lr: float,
                     seed: int) -> dict:
    """Plain full-width training (the user's 'already trained' model); returns its test accuracy and time."""
    module, _, name = factory.partition(":")
    torch.manual_seed(seed)  # the base seed draws the initial weights too: a second base model is independent
    model = getattr(importlib.import_module(module), name)()
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


def convert(state_dict: Path, factory: str, workspace: Path, groups: int) -> None:
    cmd = [sys.executable, "-m", "dyncompile", "convert", str(state_dict), "--arch", factory,
           "--input-shape", ",".join(map(str, INPUT_SHAPE)),
           "--groups", str(groups), "--workspace", str(workspace), "--json"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def split_variant(variant: str) -> tuple[str, str | None, dict]:
    """"usnet+l1" → ("usnet", "l1", {}), "progressive+lazy" → ("progressive", None, {"greedy": "lazy"}),
    "progressive+finetune_check_images=1024" → ("progressive", None, {"finetune_check_images": 1024}): a method,
    the ranking it runs with (None: the method's default) and the `SearchOptions` it changes."""
    method, *extras = variant.split("+")
    overrides = {"greedy": "lazy"} if "lazy" in extras else {}
    defaults = SearchOptions()
    for extra in (e for e in extras if "=" in e):
        field, value = extra.split("=", 1)
        if not hasattr(defaults, field):
            raise SystemExit(f"variant '{variant}': SearchOptions has no field '{field}'")
        overrides[field] = type(getattr(defaults, field))(value)
    rank = next((e for e in extras if e != "lazy" and "=" not in e), None)
    return method, rank, overrides


def run_method(base: Path, work: Path, variant: str, seed: int, args, *, epochs: float | None = None,
               lr: float | None = None, tag: str = "") -> dict:
    method, rank, overrides = split_variant(variant)
    ws = work / f"{variant}{tag}-seed{seed}"
    shutil.rmtree(ws, ignore_errors=True)
    shutil.copytree(base, ws)
    options = SearchOptions(method=method, seed=seed, epochs=args.epochs if epochs is None else epochs,
                            train_limit=args.train_limit, val_limit=args.val_limit, subnets=tuple(args.subnets),
                            batch_size=args.batch_size, lr=args.lr if lr is None else lr, train_full=0,
                            rank=rank or (args.rank if method == "progressive" else None),
                            rank_direction=args.rank_direction, joint_pool=args.joint_pool,
                            budget_window=args.budget_window, search_limit=args.search_limit)
    options = dataclasses.replace(options, **overrides)
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
    by_budget = {}  # a sub-net two budgets share (a note in the log) serves both
    for b in sorted(args.subnets):
        s = min((s for s in result.subnets if s.budget <= b + 1e-9), key=lambda s: b - s.budget)
        by_budget[f"{b:g}"] = {"macs_fraction": s.macs_fraction, "accuracy": s.accuracy, "config": s.config,
                               "name": s.name}
    record = {"method": variant, "seed": seed, "wall_s": round(wall, 1), "finetunes": len(finetunes),
              "epochs": options.epochs, "lr": options.lr, "compute": result.compute,
              "train_gmacs": train_gmacs(result.compute), "subnets": by_budget,
              "notes": [e["text"] for e in result.history if e["event"] == "note"]}
    if method == "usnet":
        # US-Nets can run any uniform width: measure them all (own BN calibration each), on the test split for
        # its Pareto envelope and on the search split for choosing its learning rate.
        record["curve"] = []
        for w in uniform_widths(run.dg, options.min_width):
            rec, _ = run.record(f"w{w:g}", uniform_config(run.dg, w), None)
            search = run.accuracy(uniform_config(run.dg, w), "search", bn="stored")
            record["curve"].append({"width": w, "macs_fraction": rec.macs_fraction, "accuracy": rec.accuracy,
                                    "search_accuracy": search})
        chosen_widths = {round(c["macs_fraction"], 6): c for c in record["curve"]}
        record["search_score"] = statistics.mean(
            chosen_widths[round(v["macs_fraction"], 6)]["search_accuracy"] for v in by_budget.values())
    return record


def train_gmacs(compute: dict) -> float:
    """Training compute of a run: forward GMACs of every sub-net pass of every training phase."""
    return sum(v["forward_gmacs"] for v in compute.get("train", {}).values())


def envelope(curve: list[dict], macs_fraction: float) -> float | None:
    """US-Nets' Pareto envelope: its best test accuracy over uniform widths at or under `macs_fraction`."""
    under = [c["accuracy"] for c in curve if c["macs_fraction"] <= macs_fraction + 1e-9]
    return max(under) if under else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(runs: list[dict], budgets: list[float], variants: list[str]) -> list[dict]:
    """Per budget and variant: MACs and accuracy (mean, std, per seed); for each progressive variant, its lead over
    each US-Nets variant at the budget and over that variant's Pareto envelope at progressive's MACs (by seed)."""
    rows = []
    for b in budgets:
        key = f"{b:g}"
        row = {"budget": b, "variants": {}, "leads": {}}
        for v in variants:
            rs = [r for r in runs if r["method"] == v]
            if rs:
                row["variants"][v] = {"accuracy": _mean_std([r["subnets"][key]["accuracy"] for r in rs]),
                                      "macs_fraction": _mean_std([r["subnets"][key]["macs_fraction"] for r in rs]),
                                      "per_seed": [r["subnets"][key]["accuracy"] for r in rs]}
        for pv in (v for v in variants if v.startswith("progressive")):
            for uv in (v for v in variants if v.startswith("usnet")):
                at_budget, at_envelope = [], []
                for pr in (r for r in runs if r["method"] == pv):
                    us = next((r for r in runs if r["method"] == uv and r["seed"] == pr["seed"]), None)
                    if us is None:
                        continue
                    at_budget.append(pr["subnets"][key]["accuracy"] - us["subnets"][key]["accuracy"])
                    best = envelope(us["curve"], pr["subnets"][key]["macs_fraction"])
                    if best is not None:
                        at_envelope.append(pr["subnets"][key]["accuracy"] - best)
                row["leads"][f"{pv} - {uv}"] = {
                    "at_budget": _mean_std(at_budget) if at_budget else None, "at_budget_per_seed": at_budget,
                    "over_envelope": _mean_std(at_envelope) if at_envelope else None,
                    "over_envelope_per_seed": at_envelope}
        rows.append(row)
    return rows


def usnet_epochs_for(gmacs: float, base: Path, args) -> float:
    """US-Nets epochs whose training compute (sandwich: largest, smallest, `sandwich_random` uniform widths per
    step, forward GMACs) equals `gmacs`: the expected cost of one epoch, from the widths' MACs."""
    from dyncompile.measure import count_macs
    from dyncompile.passes.extract import extract_subnet
    from dyncompile.workspace import load_workspace

    dg = load_workspace(base).dg
    o = SearchOptions()
    shape = (1, *dg.input_shape[1:])
    full = count_macs(dg.gm, shape)
    cache: dict[tuple, int] = {}

    def macs(w: float) -> int:
        config = uniform_config(dg, w)
        key = tuple(sorted(config.items()))
        if key not in cache:
            cache[key] = count_macs(extract_subnet(dg, config), shape)
        return cache[key]

    gen = torch.Generator().manual_seed(0)
    draws = (o.min_width + (1 - o.min_width) * torch.rand(2000, generator=gen)).tolist()
    per_image = full + macs(o.min_width) + o.sandwich_random * statistics.mean(macs(w) for w in draws)
    train_images = len(open_dataset("fashion-mnist", input_shape=dg.input_shape, train_limit=args.train_limit,
                                    seed=0).train)
    return gmacs * 1e9 / (per_image * train_images)


def run_jobs(jobs: list[tuple[str, int, float | None, float | None, str]], args) -> list[dict]:
    """Run (variant, seed, epochs, lr, tag) jobs, `args.jobs` at a time, each in its own process."""
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    passthrough = [a for a in sys.argv[1:] if a != "--reuse"]
    jobs, running, records = list(jobs), [], []
    while jobs or running:
        while jobs and len(running) < args.jobs:
            variant, seed, epochs, lr, tag = job = jobs.pop(0)
            cmd = [sys.executable, __file__, *passthrough, "--single", variant, str(seed), f"--single-tag={tag}"]
            cmd += ["--single-epochs", str(epochs)] if epochs is not None else []
            cmd += ["--single-lr", str(lr)] if lr is not None else []
            running.append((subprocess.Popen(cmd, env={**os.environ, "BENCH_THREADS": str(threads)}), job))
        time.sleep(2)
        for proc, job in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, job))
            variant, seed, _, _, tag = job
            if proc.returncode != 0:
                raise SystemExit(f"{variant}{tag} seed {seed} failed (exit {proc.returncode})")
            r = json.loads((args.work / f"{variant}{tag}-seed{seed}.json").read_text())
            records.append(r)
            print(f"   {variant}{tag} seed {seed}: " + ", ".join(
                f"{b}: {100 * s['accuracy']:.2f}% @ {100 * s['macs_fraction']:.1f}% MACs" for b, s in r["subnets"].items())
                + f" ({r['wall_s']:.0f} s, {r['train_gmacs']:.0f} training GMACs, {r['epochs']:.2f} epochs, "
                  f"lr {r['lr']:g})", flush=True)
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="resnet20", help="the network every method starts from")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--val-limit", type=int, default=None, help="test images (default: all 10,000)")
    p.add_argument("--epochs", type=float, default=3.0, help="multi-sub-net training epochs (progressive; and US-Nets "
                   "with --usnet-compute same-epochs)")
    p.add_argument("--full-epochs", type=int, default=5, help="full-width training of the shared starting model")
    p.add_argument("--base-seed", type=int, default=0, help="seed of the base model's full-width training")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--usnet-lrs", default="", help="US-Nets learning rates to sweep (seed 0, scored on the search "
                   "split); empty: --lr")
    p.add_argument("--usnet-compute", choices=("equal", "same-epochs"), default="equal",
                   help="equal: US-Nets epochs set so its training GMACs equal the progressive run's (per seed)")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--subnets", default="0.1,0.25,0.5,1.0")
    p.add_argument("--rank", default="noise", help="progressive's ranking (a variant's +rank overrides it)")
    p.add_argument("--rank-direction", default="tolerant-first")
    p.add_argument("--search-limit", type=int, default=None, help="images in the search split (default: 10%% "
                   "of the training subset)")
    p.add_argument("--joint-pool", default="chosen")
    p.add_argument("--budget-window", default="under")
    p.add_argument("--methods", default="usnet,usnet+l1,progressive",
                   help="variants: usnet, usnet+l1, usnet+noise, progressive, progressive+l1, progressive+none, "
                        "progressive+lazy")
    p.add_argument("--work", type=Path, default=Path("/tmp/dyncompile-bench-search"))
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process with "
                   "torch threads = cores / jobs (seeds and methods are independent)")
    p.add_argument("--reuse", action="store_true", help="reuse the trained full model and workspace in --work")
    p.add_argument("--single", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--single-epochs", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--single-lr", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--single-tag", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "search_vs_usnet.json")
    args = p.parse_args()
    args.subnets = [float(b) for b in args.subnets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.methods.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    base, weights = args.work / "base-workspace", args.work / "full.pt"
    if args.single:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
        variant, seed = args.single[0], int(args.single[1])
        record = run_method(base, args.work, variant, seed, args, epochs=args.single_epochs, lr=args.single_lr,
                            tag=args.single_tag)
        (args.work / f"{variant}{args.single_tag}-seed{seed}.json").write_text(json.dumps(record))
        return

    full_record = args.work / "full.json"
    if args.reuse and full_record.exists() and (base / "workspace.json").exists():
        full = json.loads(full_record.read_text())
        print(f"1. reusing the trained full model in {args.work}", flush=True)
    else:
        print(f"1. training the shared full model ({args.full_epochs} epochs, {args.train_limit} images, "
              f"seed {args.base_seed})", flush=True)
        full = train_full_model(weights, MODELS[args.model][1], train_limit=args.train_limit, epochs=args.full_epochs,
                                batch_size=args.batch_size, lr=0.1, seed=args.base_seed)
        shutil.rmtree(base, ignore_errors=True)
        convert(weights, MODELS[args.model][1], base, args.groups)
        full_record.write_text(json.dumps(full))
    print(f"   full model: {100 * full['test_accuracy']:.2f}% test accuracy ({full['seconds']:.0f} s to train)", flush=True)

    progressive = [v for v in variants if v.startswith("progressive")]
    usnets = [v for v in variants if v.startswith("usnet")]
    print(f"2. progressive variants {progressive}, seeds {seeds}", flush=True)
    runs = run_jobs([(v, s, None, None, "") for v in progressive for s in seeds], args)

    def usnet_epochs(seed: int) -> float:
        reference = next((r for r in runs if r["method"] == (progressive or [""])[0] and r["seed"] == seed), None)
        if args.usnet_compute == "same-epochs" or reference is None:
            return args.epochs
        return usnet_epochs_for(reference["train_gmacs"], base, args)

    sweeps = {}
    chosen_lr = {}
    for v in usnets:
        lrs = [float(x) for x in args.usnet_lrs.split(",") if x] or [args.lr]
        if len(lrs) > 1:
            print(f"3. {v}: learning rate from {lrs} on the search split (seed {seeds[0]})", flush=True)
            swept = run_jobs([(v, seeds[0], usnet_epochs(seeds[0]), lr, f"-lr{lr:g}") for lr in lrs], args)
            best = max(swept, key=lambda r: r["search_score"])
            sweeps[v] = [{"lr": r["lr"], "search_score": r["search_score"]} for r in swept]
            chosen_lr[v] = best["lr"]
            print(f"   {v}: lr {best['lr']:g} (search-split score {100 * best['search_score']:.2f}%)", flush=True)
            runs.append(best)  # the chosen lr's seed-0 run is that variant's seed-0 run
            todo = [s for s in seeds if s != seeds[0]]
        else:
            chosen_lr[v], todo = lrs[0], seeds
        runs += run_jobs([(v, s, usnet_epochs(s), chosen_lr[v], "") for s in todo], args)
    for r in runs:
        r["method"] = r["method"].split("-lr")[0]
    runs.sort(key=lambda r: (r["seed"], r["method"]))

    rows = table(runs, args.subnets, variants)
    print()
    print(f"{MODELS[args.model][0]} on Fashion-MNIST ({args.train_limit} training images, full test set"
          f"{'' if args.val_limit is None else f' cut to {args.val_limit}'}), groups {args.groups}, progressive "
          f"{args.epochs:g} epochs, US-Nets {args.usnet_compute} compute, lr {chosen_lr}, seeds {args.seeds}, "
          f"base-model seed {args.base_seed}; budgets are caps; mean ± std over seeds")
    print(f"{'budget':>7} | " + " | ".join(f"{v:>22}" for v in variants))
    for row in rows:
        cells = []
        for v in variants:
            x = row["variants"].get(v)
            cells.append(f"{100 * x['accuracy'][0]:6.2f} ± {100 * x['accuracy'][1]:4.2f} @{100 * x['macs_fraction'][0]:5.1f}%"
                         if x else f"{'n/a':>22}")
        print(f"{100 * row['budget']:6.0f}% | " + " | ".join(f"{c:>22}" for c in cells))
    print("leads (points, mean ± std over seeds): at the budget / over US-Nets' Pareto envelope at progressive's MACs")
    for row in rows:
        for pair, lead in row["leads"].items():
            fmt = lambda m: f"{100 * m[0]:+6.2f} ± {100 * m[1]:4.2f}" if m else "   n/a"  # noqa: E731
            print(f"{100 * row['budget']:6.0f}% {pair:>30}: {fmt(lead['at_budget'])} / {fmt(lead['over_envelope'])}"
                  f"   per seed {[round(100 * x, 2) for x in lead['at_budget_per_seed']]}")
    print("where the time went (mean per seed: wall s / training sub-net images / evaluation sub-net images):")
    for v in variants:
        rs = [r for r in runs if r["method"] == v]
        parts = sorted({p for r in rs for p in r["compute"].get("parts", {})})
        cell = lambda p, key: statistics.mean(r["compute"]["parts"].get(p, {}).get(key, 0) for r in rs)  # noqa: E731
        print(f"{v:>18}: " + ", ".join(f"{p} {cell(p, 'seconds'):.0f} s / {cell(p, 'train_subnet_images'):.0f} / "
                                        f"{cell(p, 'eval_subnet_images'):.0f}" for p in parts))
    for v in variants:
        rs = [r for r in runs if r["method"] == v]
        if rs:
            print(f"{v:>18}: {statistics.mean(r['wall_s'] for r in rs):6.0f} s wall, "
                  f"{statistics.mean(r['train_gmacs'] for r in rs):8.0f} training GMACs, "
                  f"{statistics.mean(r['epochs'] for r in rs):.2f} epochs per seed")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(sys.argv), "full_model": full, "runs": runs, "table": rows, "lr_sweeps": sweeps,
              "chosen_lr": chosen_lr,
              "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
