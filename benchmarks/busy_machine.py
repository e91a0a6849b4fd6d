"""A deployable on a busy CPU: TVM's thread pool with and without `dyncompile.thread_guard`, beside busy processes.

Starts 0, then `--busy` (default 2, 3) processes that spin on the CPU (`while True: pass`), and with each load runs
every sub-net of the deployable `--calls` times in a fresh process, with the guard off (TVM's pool as it sets
itself) and on. Prints median / 90th percentile / slowest ms per sub-net and the pool's thread count at the end.
Without a deployable it builds ResNet-20 (Fashion) at widths 1/.75/.5/.25 first. Stop other work first: the
busy processes are the only load this should see.

    .venv/bin/python benchmarks/busy_machine.py [--deployable PATH] [--busy 2,3] [--calls 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, sys, time
import numpy as np
import dyncompile.runtime as runtime
model = runtime.load(sys.argv[1])
x = np.zeros(model.input_shape, np.float32)
rows = {}
for s in model.subnets:
    times = []
    for _ in range(int(sys.argv[2])):
        start = time.perf_counter()
        model.run(x, subnet=s.name)
        times.append(1e3 * (time.perf_counter() - start))
    times.sort()
    rows[s.name] = [times[len(times) // 2], times[int(0.9 * len(times))], times[-1]]
print(json.dumps({"rows": rows, "threads": model.threads}))
"""


def build_default(out: Path) -> Path:
    import torch

    from dyncompile.build import build, uniform_subnets
    from dyncompile.deployable import write_deployable
    from dyncompile.pipeline import analyse_model
    from dyncompile.zoo.resnet import resnet20_fashion

    torch.manual_seed(0)
    dg = analyse_model(resnet20_fashion().eval(), (1, 1, 28, 28), groups=8)
    return write_deployable(out, build(dg, uniform_subnets(dg), target="cpu"), dg)


def measure(deployable: Path, calls: int, guard: str) -> dict:
    env = {**os.environ, "DYNCOMPILE_THREAD_GUARD": guard}
    done = subprocess.run([sys.executable, "-c", CHILD, str(deployable), str(calls)], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deployable", type=Path, default=None)
    parser.add_argument("--busy", default="2,3", help="numbers of busy processes to run beside it (0 always runs)")
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dyncompile-busy-") as tmp:
        deployable = args.deployable or build_default(Path(tmp) / "deploy")
        print(f"{deployable}: {os.cpu_count()} CPUs; per sub-net median / p90 / slowest ms of {args.calls} calls")
        print("| busy processes | guard | sub-nets | threads at the end |")
        print("|---|---|---|---|")
        for busy in [0, *(int(b) for b in args.busy.split(",") if b)]:
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                for guard in ("off", "on"):
                    got = measure(deployable, args.calls, guard)
                    cells = ", ".join(f"{name} {m:.3f}/{p90:.3f}/{worst:.1f}" for name, (m, p90, worst)
                                      in got["rows"].items())
                    print(f"| {busy} | {guard} | {cells} | {got['threads'] or 'TVM default'} |", flush=True)
            finally:
                for p in spinners:
                    p.kill()
                    p.wait()


if __name__ == "__main__":
    main()
