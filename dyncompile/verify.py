"""The conversion's guarantees, checked on demand (`dyncompile verify`).

For each uniform width w (every free set keeps ceil(w·G) groups):
1. full width: the converted (slimmable, masked) model computes what the original did
   (max abs error ≤ 1e-5 × output scale, float32, the model's own weights);
2. the extracted sub-net — a plain, physically smaller module, re-traceable by torch.fx — computes exactly what
   the *masked reference* computes: the original graph with the dropped channels zeroed where they are
   produced. Checked in float64 with randomised BatchNorm statistics and affine parameters, so a miswired
   extraction (a wrong channel, a wrong BN slice) cannot pass by accident;
3. MACs and parameters of every sub-net, counted by `torch.utils.flop_counter`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dyncompile.errors import one_line
from dyncompile.ir import DynGraph, output_tensors, uniform_config
from dyncompile.layer_rules import ProducerRule, layer_rule_for
from dyncompile.layers import ChannelMask
from dyncompile.measure import count_macs, count_params
from dyncompile.passes.extract import extract_subnet
from dyncompile.passes.trace import retrace
from dyncompile.passes.rewrite import convert_to_slimmable, insert_channel_masks, set_subnet

__all__ = ["WidthReport", "verify", "randomise_norm_statistics", "output_error", "output_scale"]

FULL_WIDTH_TOLERANCE = 1e-5  # × output scale, float32
EXTRACT_TOLERANCE = 1e-9  # × output scale, float64


@dataclass
class WidthReport:
    width: float
    groups_kept: dict[str, int]
    full_width_error: float | None  # only at width 1.0
    extract_error: float
    tolerance: float
    macs: int
    macs_fraction: float
    params: int
    conv_channels: int  # output channels of all convs/linears in the extracted network
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def randomise_norm_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """In place: random running statistics and affine parameters for every norm layer."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype) + 0.5)
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and getattr(m, "weight", None) is not None:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype) * 0.5)
    return model


def output_scale(y) -> float:
    """The largest magnitude over all of a model's outputs."""
    return max(max(float(t.abs().max()) for t in output_tensors(y)), 1e-12)


def output_error(got, expected) -> float:
    """Largest absolute difference over all outputs; inf when their number or shapes differ."""
    got, expected = output_tensors(got), output_tensors(expected)
    if len(got) != len(expected) or any(a.shape != b.shape for a, b in zip(got, expected)):
        return float("inf")
    return max(float((a - b).abs().max()) for a, b in zip(got, expected))


def _equal(a, b) -> bool:
    a, b = output_tensors(a), output_tensors(b)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _conv_channels(model: nn.Module) -> int:
    """Output channels of every producer layer (the layer rules say which layers produce channels)."""
    return sum(getattr(m, "out_channels", 0) or getattr(m, "out_features", 0)
               for m in model.modules() if isinstance(layer_rule_for(m), ProducerRule))


def _verify_width(dg: DynGraph, width: float, config: dict, masked, weights, x64: torch.Tensor,
                  full_macs: int) -> WidthReport:
    set_subnet(masked, dg, config)
    problems: list[str] = []
    subnet = extract_subnet(dg, config, weights).eval()
    with torch.no_grad():
        expected = masked(x64)
        got = subnet(x64)
        retraced = retrace(subnet, dg.leaf_modules)(x64)
    error = output_error(got, expected)
    tolerance = EXTRACT_TOLERANCE * output_scale(expected)
    if not error <= tolerance:
        problems.append(f"extracted sub-net differs from the masked model by {error:.3g} (> {tolerance:.3g})")
    if not _equal(retraced, got):
        problems.append("re-tracing the extracted sub-net with torch.fx changes its output")
    if any(isinstance(m, ChannelMask) for m in subnet.modules()):
        problems.append("extracted sub-net still contains masks")
    channels = _conv_channels(subnet)
    drops_something = any(kept < len(dg.set_by_name(name).groups) for name, kept in config.items())
    if drops_something and channels >= _conv_channels(dg.gm):
        problems.append("extracted sub-net is not smaller than the full network")
    macs = count_macs(subnet, (1, *dg.input_shape[1:]))  # weights do not change MACs or parameter counts
    return WidthReport(
        width=width, groups_kept=config, full_width_error=None, extract_error=error, tolerance=tolerance,
        macs=macs, macs_fraction=macs / full_macs if full_macs else 1.0, params=count_params(subnet),
        conv_channels=channels, problems=problems,
    )


def verify(dg: DynGraph, widths: list[float], reference: tuple[torch.Tensor, torch.Tensor] | None = None,
           seed: int = 0) -> list[WidthReport]:
    """Check the three guarantees at each width; `reference` = (input, output of the user's original model)."""
    batch_shape = (2, *dg.input_shape[1:])
    g = torch.Generator().manual_seed(seed)
    x32 = torch.randn(*batch_shape, generator=g)
    full_macs = count_macs(dg.gm, (1, *dg.input_shape[1:]))

    converted = convert_to_slimmable(dg).eval()
    with torch.no_grad():
        ref_in, ref_out = reference if reference is not None else (x32, dg.gm(x32))
        full_error = output_error(converted(ref_in), ref_out)
    full_tolerance = FULL_WIDTH_TOLERANCE * output_scale(ref_out)

    weights = randomise_norm_statistics(copy.deepcopy(dg.gm).double(), seed)
    masked = insert_channel_masks(dg, weights).double().eval()
    x64 = x32.double()
    reports = []
    for width in widths:
        config = uniform_config(dg, width)
        try:
            report = _verify_width(dg, width, config, masked, weights, x64, full_macs)
        except Exception as exc:  # noqa: BLE001 - a failure at one width is that width's problem
            report = WidthReport(width=width, groups_kept=config, full_width_error=None, extract_error=float("inf"),
                                 tolerance=0.0, macs=0, macs_fraction=0.0, params=0, conv_channels=0,
                                 problems=[one_line(exc)])
        if width == 1.0:
            report.full_width_error = full_error
            if not full_error <= full_tolerance:
                report.problems.append(f"converted model differs from the original by {full_error:.3g} "
                                       f"(> {full_tolerance:.3g})")
        reports.append(report)
    return reports
