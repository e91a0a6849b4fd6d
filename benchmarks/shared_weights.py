"""What reading shared weights in place costs or buys, side by side in one process (issue 11's memory route).

For each model and batch size the four uniform widths (or `search:WORKSPACE`: a search's sub-nets, their weights
in the stored channel order of targets/channel_order.py) are built twice, as `dyncompile build --target cpu` builds
them (`layout="blocked"`: every sub-net reads each conv and dense weight from one stored tensor,
targets/shared_weights.py) and with each sub-net's own blocked copy of its weights (`layout="blocked-copies"`,
what builds did before). Both deployables are loaded with `dyncompile.runtime.load`, every output is checked
against the other's, and each sub-net is timed with `dyncompile.bench.interleaved_medians` (turns of 20 calls,
the lowest turn median). Also printed: the bytes of the distinct weight tensors each loaded model holds.

    .venv/bin/python benchmarks/shared_weights.py --models resnet20-fashion,mobilenetv2-224,resnet18-224 --batches 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402

from dyncompile import runtime  # noqa: E402
from dyncompile.bench import interleaved_medians  # noqa: E402
from dyncompile.build import build  # noqa: E402
from dyncompile.deployable import write_deployable  # noqa: E402
from latency import MODELS, model_subnets  # noqa: E402  (the same models as benchmarks/latency.py)

LAYOUTS = ("blocked", "blocked-copies")


def held_bytes(model: runtime.LocalModel) -> int:
    """Bytes of the distinct weight tensors the loaded model keeps for all its sub-nets."""
    held = {t.data_ptr(): t.numel() * t.dtype.bits // 8 for name in model.names for t in model.weights_of(name)}
    return sum(held.values())


def compare(key: str, batch: int, repeats: int, workdir: Path) -> None:
    dg, subnets, own_tensors, _ = model_subnets(key, argparse.Namespace(group_multiple=1))
    weights = sum(t.numel() * t.element_size() for t in dg.gm.state_dict().values() if t.is_floating_point())
    models = {}
    for layout in LAYOUTS:
        result = build(dg, subnets, target="cpu", batch_size=batch, layout=layout, own_tensors=own_tensors)
        models[layout] = runtime.load(write_deployable(workdir / f"{Path(key).name}-{batch}-{layout}", result, dg))
    x = np.random.default_rng(0).standard_normal((batch, *dg.input_shape[1:])).astype("float32")
    print(f"\n{key}, batch {batch}: weights {weights / 2**20:.1f} MB; held by the loaded model: "
          + ", ".join(f"{layout} {held_bytes(m) / 2**20:.1f} MB ({held_bytes(m) / weights:.2f}×)"
                      for layout, m in models.items()))
    print("| sub-net | shared ms | copies ms | shared ÷ copies | max difference |\n|---|---|---|---|---|")
    for name in models["blocked"].names:
        outputs = [np.asarray(m.run(x, subnet=name)) for m in models.values()]
        difference = float(np.abs(outputs[0] - outputs[1]).max())
        if difference > 1e-4:
            raise SystemExit(f"{key} {name}: the two builds differ by {difference:.2e}")
        ms = interleaved_medians({layout: m.prepared(name, x) for layout, m in models.items()}, repeats=repeats)
        print(f"| {name} | {ms['blocked']:.4f} | {ms['blocked-copies']:.4f} | "
              f"{ms['blocked'] / ms['blocked-copies']:.3f} | {difference:.1e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet20-fashion,mobilenetv2-224,resnet18-224",
                        help=f"of {', '.join(MODELS)}, or search:WORKSPACE (the sub-nets a search chose there)")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--repeats", type=int, default=160, help="timed calls per build and sub-net")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dyncompile-shared-") as tmp:
        for key in args.models.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                compare(key, batch, args.repeats, Path(tmp))


if __name__ == "__main__":
    main()
