"""How the progressive search's greedy phase grows with the number of channel sets (issue 14).

    python benchmarks/search_scaling.py --budget 0.98

For ResNet-20, ResNet-110 and ResNet-164 on 1×28×28 (12, 57 and 112 free channel sets at 8 groups), each
briefly trained at full width on real Fashion-MNIST (`--train-limit` images, `--train-full` epochs, the same
for every greedy mode), runs the first `--steps` greedy steps of the progressive search with each `--greedy`
mode and prints, per model and mode: candidate evaluations in the first step (every set, in both modes) and
per later step, and the greedy phase's wall time per step. A chain to a fixed MACs budget has a number of
steps that grows with the sets, so the whole search costs (evaluations per step) × (steps): quadratic in the
sets for exhaustive, linear for lazy if its evaluations per step stay flat.

Settings that keep the runs short and about the greedy phase alone: channel order by L1 (no noise pass), no
fine-tunes (absolute threshold 0), no joint training (`--epochs 0`). Wall times are comparable within a model
only (a deeper model costs more per evaluation); run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dyncompile.search.run import SearchOptions, SearchRun  # noqa: E402
from dyncompile.search.train import Processes  # noqa: E402

MODELS = {"resnet20": "dyncompile.zoo.resnet:resnet20_fashion", "resnet110": "dyncompile.zoo.resnet:resnet110_fashion",
          "resnet164": "dyncompile.zoo.resnet:resnet164_fashion"}


def convert(spec: str, workspace: Path) -> None:
    if (workspace / "workspace.json").exists():
        return
    subprocess.run([sys.executable, "-m", "dyncompile", "convert", spec, "--input-shape", "1,1,28,28", "--groups", "8",
                    "--workspace", str(workspace), "--json"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


class StepsDone(Exception):
    """Raised from the progress callback after `--steps` steps: the measurement has what it needs."""


def run_greedy(base: Path, work: Path, greedy: str, args) -> dict:
    ws = work / greedy
    shutil.rmtree(ws, ignore_errors=True)
    shutil.copytree(base, ws)
    options = SearchOptions(method="progressive", greedy=greedy, lazy_scores=args.lazy_scores, rank="l1", seed=0,
                            subnets=(0.25, 1.0), epochs=0, train_limit=args.train_limit, val_limit=200,
                            train_full=args.train_full, threshold_mode="absolute", finetune_threshold=0.0,
                            calibration_images=128, checkpoint_every_s=1e9)
    events: list[dict] = []

    def progress(kind: str, **info) -> None:
        if kind == "event":
            events.append(info)
            if info["event"] == "step" and info["step"] >= args.steps:
                raise StepsDone

    try:
        SearchRun(ws, options, procs=Processes(), progress=progress).run()
    except StepsDone:
        pass
    start = next(e["time_s"] for e in events if e["event"] == "search-start")
    steps = [e for e in events if e["event"] == "step"]
    later = steps[1:]
    return {"greedy": greedy, "steps": len(steps), "first_step_evaluations": steps[0]["scored"],
            "later_evaluations_per_step": sum(e["scored"] for e in later) / max(1, len(later)),
            "first_step_s": steps[0]["time_s"] - start,
            "later_s_per_step": (steps[-1]["time_s"] - steps[0]["time_s"]) / max(1, len(later)),
            "finetunes": sum(1 for e in events if e["event"] == "finetune"),
            "dropped": [e["dropped"] for e in steps], "macs_fraction": steps[-1]["macs_fraction"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20,resnet110,resnet164")
    p.add_argument("--greedy", default="exhaustive,lazy")
    p.add_argument("--steps", type=int, default=8, help="greedy steps measured per model and mode")
    p.add_argument("--train-limit", type=int, default=1000)
    p.add_argument("--train-full", type=float, default=1.0)
    p.add_argument("--lazy-scores", type=int, default=4)
    p.add_argument("--work", type=Path, default=Path("/tmp/dyncompile-search-scaling"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "search_scaling.json")
    args = p.parse_args()

    from dyncompile.workspace import load_workspace

    rows = []
    for model in args.models.split(","):
        base = args.work / model / "base"
        convert(MODELS[model], base)
        sets = len(load_workspace(base).dg.free_sets)
        for greedy in args.greedy.split(","):
            row = run_greedy(base, args.work / model, greedy, args) | {"model": model, "sets": sets}
            rows.append(row)
            print(f"{model:10s} {sets:4d} sets  {greedy:10s} {row['first_step_evaluations']:4d} evaluations in step 1 "
                  f"({row['first_step_s']:.1f} s), {row['later_evaluations_per_step']:.1f} a step after "
                  f"({row['later_s_per_step']:.1f} s)", flush=True)
    print(f"\nfirst {args.steps} greedy steps; {args.train_limit} training images ({args.train_full:g} epochs at full "
          f"width first), search split 10% of them, L1 order, no fine-tunes")
    print(f"{'model':10s} {'sets':>5s} {'mode':10s} {'step 1: evals':>14s} {'s':>7s} {'later: evals/step':>18s} "
          f"{'s/step':>7s}")
    for r in rows:
        print(f"{r['model']:10s} {r['sets']:5d} {r['greedy']:10s} {r['first_step_evaluations']:14d} "
              f"{r['first_step_s']:7.1f} {r['later_evaluations_per_step']:18.1f} {r['later_s_per_step']:7.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
