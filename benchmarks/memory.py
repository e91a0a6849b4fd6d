"""Resident memory of a loaded deployable against the size of its weights (issue 11's memory goal: ≤ 1.1×).

Builds ResNet-18 at 224×224 (real widths) at widths 1/.75/.5/.25 into one cpu deployable, then, in a fresh
process, loads it with `dyncompile.runtime.load` and runs every sub-net once. Prints the process's resident set
before loading, after loading, after the runs (steady state), and the peak (`ru_maxrss`), each as an increase over
the baseline and as a multiple of the full weights' bytes.

    .venv/bin/python benchmarks/memory.py
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
import json, resource, sys
import numpy as np

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

import tvm, dyncompile.runtime as runtime  # imports first: they are not the deployable's memory
base, base_peak = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = runtime.load(sys.argv[1])
loaded = rss()
x = np.zeros(model.input_shape, np.float32)
for s in model.subnets:
    model.run(x, subnet=s.name)
ran = rss()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "loaded": loaded, "ran": ran, "peak": peak, "base_peak": base_peak}))
"""


def main() -> None:
    import torch

    from dyncompile.build import build, uniform_subnets
    from dyncompile.deployable import write_deployable
    from dyncompile.pipeline import analyse_model
    from dyncompile.zoo.resnet import resnet18

    torch.manual_seed(0)
    dg = analyse_model(resnet18().eval(), (1, 3, 224, 224), groups=8)
    weights = sum(t.numel() * t.element_size() for t in dg.gm.state_dict().values())
    with tempfile.TemporaryDirectory() as tmp:
        out = write_deployable(Path(tmp) / "d", build(dg, uniform_subnets(dg)), dg)
        on_disk = (out / "weights.npz").stat().st_size
        got = json.loads(subprocess.run([sys.executable, "-c", MEASURE, str(out)], check=True, capture_output=True,
                                        text=True).stdout.strip().splitlines()[-1])
    mb = 1 / 2**20
    print(f"ResNet-18 224×224, sub-nets w100/w75/w50/w25 in one cpu deployable; full weights {weights * mb:.1f} MB "
          f"({on_disk * mb:.1f} MB weights.npz)")
    print("| state | RSS increase MB | × full weights |\n|---|---|---|")
    for label, key in (("loaded", "loaded"), ("after one run of each sub-net (steady)", "ran")):
        print(f"| {label} | {(got[key] - got['base']) * mb:.1f} | {(got[key] - got['base']) / weights:.2f} |")
    peak = got["peak"] - got["base"]
    print(f"| peak (ru_maxrss − RSS before loading) | {peak * mb:.1f} | {peak / weights:.2f} |")


if __name__ == "__main__":
    main()
