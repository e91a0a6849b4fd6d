"""Resident memory of a loaded deployable against the size of its weights (issue 11's memory goal: ≤ 1.1×).

Builds ResNet-18 at 224×224 (real widths) at widths 1/.75/.5/.25 into one cpu deployable, then, in a fresh
process, loads it with `dyncompile.runtime.load` and runs every sub-net once. Prints the process's resident set
after loading and after the runs (steady state), and its peak while loading and to the end (Linux's VmHWM, reset
through /proc/self/clear_refs after the imports), each as an increase over the resident set before loading and as
a multiple of the full weights' bytes; and the bytes of the distinct weight tensors the loaded model holds.

    .venv/bin/python benchmarks/memory.py
    .venv/bin/python benchmarks/memory.py --workspace WS   # a workspace's sub-nets instead (a search's, if it ran)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MEASURE = r"""
import json, sys
import numpy as np

def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

import tvm, dyncompile.runtime as runtime  # imports first: they are not the deployable's memory
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current resident set: the imports' own peak is not counted
base = rss = status("VmRSS")
model = runtime.load(sys.argv[1])
loaded, load_peak = status("VmRSS"), status("VmHWM")
held = {t.data_ptr(): t.numel() * int(t.dtype.bits) // 8 for name in model.names for t in model.weights_of(name)}
x = np.zeros(model.input_shape, np.float32)
for s in model.subnets:
    model.run(x, subnet=s.name)
ran = status("VmRSS")
print(json.dumps({"base": base, "loaded": loaded, "load_peak": load_peak, "ran": ran, "peak": status("VmHWM"),
                  "held": sum(held.values())}))
"""


def main() -> None:
    import argparse

    import torch

    from dyncompile.build import build, build_deployable, uniform_subnets
    from dyncompile.deployable import write_deployable
    from dyncompile.pipeline import analyse_model
    from dyncompile.workspace import load_workspace
    from dyncompile.zoo.resnet import resnet18

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", help="build this workspace's sub-nets (its search's, if one ran) instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.workspace:
            dg = load_workspace(args.workspace).dg
            built = build_deployable(args.workspace, output=Path(tmp) / "d", measure=False)
            out, what = built.path, f"{args.workspace}: sub-nets {', '.join(s.name for s in built.result.subnets)}"
        else:
            torch.manual_seed(0)
            dg = analyse_model(resnet18().eval(), (1, 3, 224, 224), groups=8)
            out = write_deployable(Path(tmp) / "d", build(dg, uniform_subnets(dg)), dg)
            what = "ResNet-18 224×224, sub-nets w100/w75/w50/w25"
        weights = sum(t.numel() * t.element_size() for t in dg.gm.state_dict().values())
        on_disk = (out / "weights.npz").stat().st_size
        got = json.loads(subprocess.run([sys.executable, "-c", MEASURE, str(out)], check=True, capture_output=True,
                                        text=True).stdout.strip().splitlines()[-1])
    mb = 1 / 2**20
    print(f"{what} in one cpu deployable; full weights {weights * mb:.2f} MB ({on_disk * mb:.2f} MB weights.npz)")
    print("| state | MB | × full weights |\n|---|---|---|")
    print(f"| weight tensors the loaded model holds (distinct buffers over all sub-nets) | {got['held'] * mb:.2f} | "
          f"{got['held'] / weights:.2f} |")
    rows = (("RSS increase, loaded", got["loaded"]), ("RSS peak while loading (VmHWM)", got["load_peak"]),
            ("RSS increase after one run of each sub-net (steady: weights + activations)", got["ran"]),
            ("RSS peak while loading and running", got["peak"]))
    for label, value in rows:
        print(f"| {label} | {(value - got['base']) * mb:.2f} | {(value - got['base']) / weights:.2f} |")

if __name__ == "__main__":
    main()
