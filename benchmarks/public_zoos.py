"""Run analyse → verify on model definitions you fetched yourself (no third-party code ships with dyncompile).

Each model is `module:factory` (optionally `module:factory@1,3,64,64` for its own input shape); `module` is
imported from `--path` (a folder you put the model files in), and `factory` is called with no arguments.
For every model it prints one line: how it traced, its channel sets, whether every width verifies, the MACs
fraction per width and why channels were kept at full width. See docs/public-zoos.md for what we ran.

    python benchmarks/public_zoos.py --path ~/zoo/pytorch-cifar models:ResNet18 models:DenseNet121 \
        --input-shape 1,3,32,32 --json results.jsonl

`--leaf-class NAME` marks every submodule of class NAME as a leaf (the same as one `--leaf` per instance).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time
import traceback
from collections import Counter

import torch

from dyncompile.errors import DyncompileError
from dyncompile.pipeline import analyse_model
from dyncompile.verify import verify


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _build(spec: str):
    module_name, _, factory = spec.partition(":")
    return getattr(importlib.import_module(module_name), factory)()


def _reason_kinds(reasons: list[str]) -> dict[str, int]:
    """Fixed reasons with node/module names blanked, counted (one line stays readable for big models)."""
    return dict(Counter(re.sub(r"'[^']*'", "'…'", r) for r in reasons))


def run_one(spec: str, shape: tuple[int, ...], groups: int, widths: list[float], leaf: list[str],
            leaf_classes: list[str]) -> dict:
    result: dict = {"model": spec, "input_shape": list(shape), "groups": groups}
    start = time.time()
    stage = "build"
    try:
        model = _build(spec).eval()
        leaves = list(leaf) + [q for q, m in model.named_modules() if type(m).__name__ in leaf_classes]
        result["leaf_modules"] = len(leaves)
        stage = "analyse"
        dg = analyse_model(model, shape, groups=groups, leaf_modules=tuple(leaves))
        result.update(trace_mode=dg.trace_mode, sets=len(dg.sets), free_sets=len(dg.free_sets),
                      fixed_channels=sum(s.fixed_channels for s in dg.sets),
                      fixed_reasons=_reason_kinds(dg.fixed_reasons))
        stage = "verify"
        reports = verify(dg, widths)
        result.update(ok=all(r.ok for r in reports),
                      macs_fraction={str(r.width): round(r.macs_fraction, 3) for r in reports},
                      problems={str(r.width): r.problems for r in reports if r.problems})
    except Exception as exc:  # noqa: BLE001 - one line per model, the run goes on
        result.update(error_stage=stage, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                      user_fixable=isinstance(exc, DyncompileError))
        if not isinstance(exc, DyncompileError):
            result["traceback"] = traceback.format_exc().strip().splitlines()[-4:]
    result["seconds"] = round(time.time() - start, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="module:factory[@1,C,H,W]")
    parser.add_argument("--path", action="append", default=[], help="folder to import model modules from")
    parser.add_argument("--input-shape", default="1,3,64,64", help="default input shape 1,C,H,W")
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--widths", default="1.0,0.75,0.5,0.25")
    parser.add_argument("--leaf", action="append", default=[], help="submodule qualname to keep opaque")
    parser.add_argument("--leaf-class", action="append", default=[], help="class name: every instance is a leaf")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--json", help="append one JSON object per model to this file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    sys.path[:0] = args.path
    widths = [float(w) for w in args.widths.split(",")]
    failures = 0
    for entry in args.models:
        spec, _, shape_text = entry.partition("@")
        result = run_one(spec, _shape(shape_text or args.input_shape), args.groups, widths, args.leaf, args.leaf_class)
        failures += not result.get("ok", False)
        if "error" in result:
            print(f"{spec}: FAILED in {result['error_stage']}: {result['error']}")
        else:
            macs = " ".join(f"{w}:{f}" for w, f in result["macs_fraction"].items())
            print(f"{spec}: {result['trace_mode']}, {result['free_sets']}/{result['sets']} sets free, "
                  f"verify {'ok' if result['ok'] else 'FAILED'}, MACs {macs}, {result['seconds']} s")
            for reason, count in result["fixed_reasons"].items():
                print(f"    fixed ×{count}: {reason}")
            for width, problems in result["problems"].items():
                print(f"    width {width}: {'; '.join(problems)}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
