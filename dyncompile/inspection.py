"""`dyncompile inspect` as a library function: the couplings, groups, fixed channels and MACs of a workspace."""

from __future__ import annotations

from pathlib import Path

from dyncompile.ir import uniform_config
from dyncompile.measure import count_macs, count_params
from dyncompile.passes.extract import extract_subnet
from dyncompile.workspace import load_workspace

__all__ = ["inspect_workspace", "INSPECT_WIDTHS"]

INSPECT_WIDTHS = (1.0, 0.75, 0.5, 0.25)


def inspect_workspace(path: str | Path) -> dict:
    ws = load_workspace(path)
    dg, spec = ws.dg, ws.spec
    widths = []
    for width in INSPECT_WIDTHS:
        subnet = extract_subnet(dg, uniform_config(dg, width))
        macs = count_macs(subnet, dg.input_shape)
        widths.append({"width": width, "macs": macs, "macs_fraction": macs / spec["macs"] if spec["macs"] else 1.0,
                       "params": count_params(subnet)})
    return {
        "workspace": str(ws.path),
        "model": spec["model"],
        "input_shape": spec["input_shape"],
        "groups": spec["groups"],
        "group_multiple": spec.get("group_multiple", 1),
        "trace_mode": spec["trace_mode"],
        "macs": spec["macs"],
        "params": spec["params"],
        "sets": [{**s.to_json(), "free": s.free} for s in dg.sets],
        "coupling_edges": [{"a": a, "b": b, "via": d.get("via", [])[:3]} for a, b, d in dg.coupling.edges(data=True)],
        "fixed_reasons": dg.fixed_reasons,
        "widths": widths,
    }
