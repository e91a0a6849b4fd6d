"""Tuning time: MetaSchedule's stock LocalBuilder against dyncompile's pooled builder, side by side in one run.

    python benchmarks/tuning_speed.py --trials 8 --widths 1.0,0.5 --rounds 1

The stock builder starts a fresh process pool for every batch of candidates, and each new worker imports TVM;
the pooled builder (`dyncompile.targets.pooled_builder`) keeps its workers. Both tune the same kernels (the zoo's
ResNet-20 for 28×28 Fashion-MNIST at the given uniform widths, prepared as `build` prepares them) with the same
trials and search strategy, each into a fresh database; the two alternate `--rounds` times. For every run the
table shows tuning seconds, seconds per kernel and the latency of the sub-nets built from that run's database
(8 trials are noisy: the latency column checks that quality is of the same order, not which is better).
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
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import torch  # noqa: E402

from dyncompile import runtime  # noqa: E402
from dyncompile.build import build, uniform_subnets  # noqa: E402
from dyncompile.deployable import write_deployable  # noqa: E402
from dyncompile.pipeline import analyse_model  # noqa: E402
from dyncompile.targets import get_target  # noqa: E402
from dyncompile.targets.llvm_common import build_candidate  # noqa: E402
from dyncompile.targets.pipeline import prepare  # noqa: E402
from dyncompile.targets.relax_import import import_subnet  # noqa: E402
from dyncompile.targets.tuning import tune  # noqa: E402
from dyncompile.zoo.resnet import resnet20_fashion  # noqa: E402


def stock_builder():
    """What `cpu.tuning_builder` was before the pooled builder: TVM's LocalBuilder, same build function."""
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(timeout_sec=120.0, f_build=build_candidate,
                                   max_workers=max(1, os.cpu_count() or 1))


def one_run(kind: str, dg, subnets: dict, trials: int, work: Path) -> dict:
    import tvm

    target = get_target("cpu").tvm_target()
    functions = {name: import_subnet(dg, name, config)[0] for name, config in subnets.items()}
    mod = prepare(tvm.IRModule(functions), target)
    tuning_dir = work / f"tuning-{kind}"
    builder = stock_builder() if kind == "stock" else None  # None: the target's own (pooled) builder
    start = time.perf_counter()
    report = tune(mod, list(subnets), target, "cpu", tuning_dir, trials, builder=builder)
    seconds = time.perf_counter() - start
    built = build(dg, subnets, tune_trials=trials, tuning_dir=tuning_dir)  # tunes nothing: all in the database
    model = runtime.load(write_deployable(work / f"deploy-{kind}", built, dg))
    latency = {s.name: model.latency_ms(s.name, repeat=50) for s in model.subnets}
    return {"builder": kind, "kernels": report.tuned, "seconds": seconds, "per_kernel_s": seconds / report.tuned,
            "latency_ms": latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--widths", default="1.0,0.5")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "tuning_speed.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    dg = analyse_model(resnet20_fashion().eval(), (1, 1, 28, 28), groups=8)
    subnets = uniform_subnets(dg, tuple(float(w) for w in args.widths.split(",")))
    rows = []
    with tempfile.TemporaryDirectory(prefix="dyncompile-tuning-speed-") as tmp:
        for round_ in range(args.rounds):
            for kind in ("stock", "pooled"):
                print(f"round {round_ + 1}: tuning with the {kind} builder…", file=sys.stderr, flush=True)
                work = Path(tmp) / f"round{round_ + 1}"
                rows.append({"round": round_ + 1, **one_run(kind, dg, subnets, args.trials, work)})
    names = list(rows[0]["latency_ms"])
    print(f"\n{args.trials} trials per kernel, ResNet-20 (Fashion-MNIST) widths {args.widths}, "
          f"{os.cpu_count()} cores\n")
    print("| round | builder | kernels | tuning s | s per kernel | " + " | ".join(f"{n} ms" for n in names) + " |")
    print("|---|---|---|---|---|" + "---|" * len(names))
    for r in rows:
        print(f"| {r['round']} | {r['builder']} | {r['kernels']} | {r['seconds']:.0f} | {r['per_kernel_s']:.1f} | "
              + " | ".join(f"{r['latency_ms'][n]:.2f}" for n in names) + " |")
    stock = sum(r["seconds"] for r in rows if r["builder"] == "stock")
    pooled = sum(r["seconds"] for r in rows if r["builder"] == "pooled")
    print(f"\npooled / stock tuning time: {pooled / stock:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
