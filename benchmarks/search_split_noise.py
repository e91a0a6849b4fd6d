"""How noisy is the search split, and which selection rule survives that noise (issue 13's measurement)?

    python benchmarks/search_split_noise.py --train-limit 4000 --sizes 445,1000,2000 --draws 300

1. Runs the demo's progressive search (ResNet-20 on real Fashion-MNIST, `--train-limit` images, 2 epochs at full
   width first) with `--epochs 0`, so the weights it saves are the ones its select phase saw.
2. Replays its chain (every committed step) and records which of a large pool of images each candidate gets
   right, BN on batch statistics as the search scores them. The pool is the test split: it serves only to
   measure the estimator here, nothing this script computes chooses a shipped sub-net.
3. For each split size n, draws `--draws` random n-image subsets of the pool and runs the selection
   (`filter_chain` + `select_for_budgets`, caps) on each, with the paired test at each `--z`. Per (n, z) it
   prints the regret (pool accuracy of the best candidate under the cap minus that of the pick, in points),
   how often the regret exceeds 1 point, and the MACs of the pick; plus the spread of one candidate's accuracy
   and of the paired difference of neighbouring candidates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dyncompile.data import loader, open_dataset  # noqa: E402
from dyncompile.search.result import apply_result, load_search_result  # noqa: E402
from dyncompile.search.select import PairedCounts, filter_chain, select_for_budgets  # noqa: E402
from dyncompile.search.subnets import SharedSubnets, correct, full_config  # noqa: E402
from dyncompile.workspace import load_workspace  # noqa: E402


def run_search(ws: Path, train_limit: int, budgets: str, seed: int) -> None:
    dc = [sys.executable, "-m", "dyncompile"]
    subprocess.run([*dc, "convert", "dyncompile.zoo.resnet:resnet20_fashion", "--input-shape", "1,1,28,28",
                    "--groups", "8", "--workspace", str(ws)], check=True)
    subprocess.run([*dc, "search", "--workspace", str(ws), "--data", "fashion-mnist", "--subnets", budgets,
                    "--train-limit", str(train_limit), "--val-limit", "500", "--train-full", "2", "--epochs", "0",
                    "--seed", str(seed), "--json"], check=True, stdout=subprocess.DEVNULL)


def chain_of(result, dg) -> list[dict]:
    """Every committed step of the search as a candidate: its config, replayed from the logged drops."""
    config = full_config(dg)
    chain = [{"step": 0, "config": dict(config)}]
    for e in result.history:
        if e["event"] == "step":
            config[e["dropped"]] -= 1
            chain.append({"step": e["step"], "config": dict(config), "macs_fraction": e["macs_fraction"]})
    chain[0]["macs_fraction"] = 1.0
    return chain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-limit", type=int, default=4000)
    p.add_argument("--sizes", default="445,1000,2000")
    p.add_argument("--z", default="0,1,2,3")
    p.add_argument("--draws", type=int, default=300)
    p.add_argument("--budgets", default="0.25,0.5,0.75,1.0")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/dyncompile-split-noise"))
    p.add_argument("--reuse", action="store_true", help="reuse the search in --work")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "search_split_noise.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    ws = args.work / "ws"
    if not args.reuse:
        import shutil
        shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True)
        run_search(ws, args.train_limit, args.budgets, args.seed)
    dg = load_workspace(ws).dg
    result, state, _ = load_search_result(ws)
    applied = apply_result(dg, result, state)
    net = SharedSubnets(applied)
    chain = chain_of(result, applied)
    pool = open_dataset("fashion-mnist", input_shape=dg.input_shape, seed=args.seed).test
    rows = []
    for i, e in enumerate(chain):
        rows.append(correct(net, e["config"], loader(pool, 500, shuffle=False), bn="batch"))
        print(f"\r  candidate {i + 1}/{len(chain)} scored on {len(pool)} pool images", end="", flush=True)
    print()
    hits = torch.stack(rows)  # candidates × pool images
    pool_acc = hits.double().mean(1)
    budgets = sorted(float(b) for b in args.budgets.split(","))
    steps = [e["step"] for e in chain]

    def oracle(b: float) -> float:
        inside = [pool_acc[i].item() for i, e in enumerate(chain)
                  if b - args.tolerance - 1e-9 <= e["macs_fraction"] <= b + 1e-9]
        return max(inside) if inside else max(pool_acc[i].item() for i, e in enumerate(chain) if e["macs_fraction"] <= b)

    gen = torch.Generator().manual_seed(1234)
    rows_out = []
    for n in (int(s) for s in args.sizes.split(",")):
        draws = [torch.randperm(hits.shape[1], generator=gen)[:n] for _ in range(args.draws)]
        single = [hits[len(chain) // 2, d].double().mean().item() for d in draws]
        neighbour = [(hits[i, d].double().mean() - hits[i + 1, d].double().mean()).item()
                     for d in draws[:50] for i in range(1, len(chain) - 1)]
        for z in (float(v) for v in args.z.split(",")):
            regret, macs_picked = {b: [] for b in budgets if b < 1}, {b: [] for b in budgets if b < 1}
            for d in draws:
                sub = hits[:, d]
                entries = [{**e, "accuracy": sub[i].double().mean().item()} for i, e in enumerate(chain)]
                better = PairedCounts.from_correct(steps, sub).better(z)
                chosen, _ = select_for_budgets(entries, budgets, args.tolerance, filtered=filter_chain(entries, better),
                                               better=better)
                for b in regret:
                    i = steps.index(chosen[b]["step"])
                    regret[b].append(100 * (oracle(b) - pool_acc[i].item()))
                    macs_picked[b].append(chosen[b]["macs_fraction"])
            row = {"n": n, "z": z, "single_sd_points": 100 * statistics.pstdev(single),
                   "neighbour_diff_sd_points": 100 * statistics.pstdev(neighbour),
                   "per_budget": {f"{b:g}": {"mean_regret_points": statistics.fmean(regret[b]),
                                             "p_regret_over_1_point": sum(r > 1 for r in regret[b]) / len(regret[b]),
                                             "mean_macs_fraction": statistics.fmean(macs_picked[b])}
                                  for b in regret}}
            rows_out.append(row)
    print(f"chain: {len(chain)} candidates; pool: {hits.shape[1]} images (test split, measurement only)")
    print(f"{'n':>5} {'z':>4} {'sd one':>7} {'sd diff':>7} | " +
          " | ".join(f"{b:>4.0%}: regret  P>1pt  MACs" for b in budgets if b < 1))
    for r in rows_out:
        cells = " | ".join(f"{v['mean_regret_points']:5.2f}  {v['p_regret_over_1_point']:5.2f}  "
                           f"{v['mean_macs_fraction']:.3f}" for v in r["per_budget"].values())
        print(f"{r['n']:>5} {r['z']:>4g} {r['single_sd_points']:7.2f} {r['neighbour_diff_sd_points']:7.2f} | {cells}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "pool_accuracy": [round(a, 4) for a in pool_acc.tolist()],
                                    "macs_fraction": [e["macs_fraction"] for e in chain], "rows": rows_out}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
