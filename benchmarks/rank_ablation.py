"""Which channel-group ranking keeps the most accuracy: noise vs L1, each direction, and a random control.

    python benchmarks/rank_ablation.py --work /tmp/dyncompile-bench-search --seeds 0,1,2

Reuses the trained, converted ResNet-20 that `search_vs_usnet.py` leaves in `--work/base-workspace`. For every
seed it runs the noise-ranking pass (`--noise-epochs`, the search's own code and options), then, for each
ranking, keeps the top k of 8 groups of every free set (k = 6, 4, 2: no retraining) and measures test accuracy
with batch-statistics BN. A ranking that carries signal keeps more accuracy than the random order; the better
of the two rankings is the `--rank` default. Prints a table (mean ± std over seeds) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dyncompile.ir import uniform_config  # noqa: E402
from dyncompile.search.rank import NoiseScales, group_order, l1_scores  # noqa: E402
from dyncompile.search.run import SearchOptions, SearchRun  # noqa: E402

ORDERS = [("noise", "tolerant-first"), ("noise", "sensitive-first"), ("l1", "tolerant-first"),
          ("l1", "sensitive-first"), ("random", "-")]
KEEP = (0.75, 0.5, 0.25)


def open_run(base: Path, work: Path, name: str, options: SearchOptions) -> SearchRun:
    ws = work / f"rank-{name}"
    shutil.rmtree(ws, ignore_errors=True)
    shutil.copytree(base, ws)
    return SearchRun(ws, options)


def measure_seed(base: Path, work: Path, seed: int, args) -> dict:
    options = SearchOptions(seed=seed, train_limit=args.train_limit, train_full=0, noise_epochs=args.noise_epochs)
    start = time.time()
    run = open_run(base, work, f"noise-seed{seed}", options)
    scales = NoiseScales(run.dg, options.noise_init)
    run.train("rank-noise", options.noise_epochs, lambda step, gen: [None], lr=options.noise_lr, scales=scales,
              distill=False, label="noise ranking")
    noise = scales.scores()
    noise_s = time.time() - start
    l1 = l1_scores(run.dg, run.net.full)
    gen = torch.Generator().manual_seed(seed)
    rows = {}
    for rank, direction in ORDERS:
        if rank == "random":
            order = {name: torch.randperm(len(v), generator=gen).tolist() for name, v in l1.items()}
        else:
            order = group_order(noise if rank == "noise" else l1, rank=rank, direction=direction)
        r = open_run(base, work, f"eval-seed{seed}", options)
        r.reorder_groups(order)
        full = r.accuracy(None, "test", bn="batch")
        rows[f"{rank} {direction}"] = {f"{k:g}": r.accuracy(uniform_config(r.dg, k), "test", bn="batch") for k in KEEP}
        rows[f"{rank} {direction}"]["1"] = full
        print(f"  seed {seed} {rank:6} {direction:15} " + "  ".join(
            f"keep {k:g}: {100 * rows[f'{rank} {direction}'][f'{k:g}']:6.2f}" for k in KEEP), flush=True)
    return {"seed": seed, "noise_pass_s": round(noise_s, 1), "accuracy": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/dyncompile-bench-search"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--noise-epochs", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rank_ablation.json")
    args = p.parse_args()
    base = args.work / "base-workspace"
    if not (base / "workspace.json").exists():
        raise SystemExit(f"no trained workspace in {base}: run benchmarks/search_vs_usnet.py --work {args.work} first")
    runs = [measure_seed(base, args.work, int(s), args) for s in args.seeds.split(",")]
    print()
    print(f"Test accuracy after keeping the top groups of every set by each ranking (no retraining; batch-statistics "
          f"BN), mean ± std over seeds {args.seeds}")
    print(f"{'ranking':24} | " + " | ".join(f"{'keep ' + format(k, 'g'):>15}" for k in KEEP))
    table = {}
    for rank, direction in ORDERS:
        key = f"{rank} {direction}"
        cells = []
        for k in KEEP:
            values = [r["accuracy"][key][f"{k:g}"] for r in runs]
            mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
            table.setdefault(key, {})[f"{k:g}"] = [mean, std]
            cells.append(f"{100 * mean:7.2f} ± {100 * std:5.2f}")
        print(f"{key:24} | " + " | ".join(cells))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"command": " ".join(sys.argv), "runs": runs, "table": table}, indent=1))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
