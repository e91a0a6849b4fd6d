"""`dyncompile convert` as a library function: load → analyse → check full width → save the workspace."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dyncompile.errors import ConfigError, InternalError
from dyncompile.ir import DynGraph
from dyncompile.loading import ModelSource, guess_input_shape, load_model
from dyncompile.measure import count_macs, count_params
from dyncompile.passes.rewrite import convert_to_slimmable
from dyncompile.pipeline import analyse_model
from dyncompile.verify import FULL_WIDTH_TOLERANCE, output_error, output_scale
from dyncompile.workspace import save_workspace

__all__ = ["ConvertResult", "convert", "parse_group_multiple"]

REFERENCE_SEED = 1234


@dataclass
class ConvertResult:
    workspace: Path
    source: ModelSource
    dg: DynGraph
    macs: int
    params: int
    full_width_error: float
    notes: list[str]

    def to_json(self) -> dict:
        return {
            "workspace": str(self.workspace),
            "model": self.source.to_json(),
            "input_shape": list(self.dg.input_shape),
            "groups": self.dg.num_groups,
            "trace_mode": self.dg.trace_mode,
            "macs": self.macs,
            "params": self.params,
            "full_width_error": self.full_width_error,
            "sets": [s.to_json() for s in self.dg.sets],
            "free_sets": len(self.dg.free_sets),
            "fixed_reasons": self.dg.fixed_reasons,
            "notes": self.notes,
        }


def parse_group_multiple(text: str) -> int:
    """`--group-multiple`: a positive integer, or "auto": the vector lanes of this machine's CPU (16 with AVX-512,
    8 with AVX2, 4 with NEON), the channel multiple its kernels fill."""
    if text == "auto":
        from dyncompile.targets import cpu
        from dyncompile.targets.llvm_common import vector_lanes

        return vector_lanes(cpu.tvm_target())
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"--group-multiple must be a positive number of channels or 'auto', got '{text}'")
    return value


def convert(model: str, *, workspace: str | Path, groups: int = 8, input_shape: tuple[int, ...] | None = None,
            leaf_modules: tuple[str, ...] = (), arch: str | None = None, trust_pickle: bool = False,
            grouped_conv_mode: str = "auto", group_multiple: int = 1,
            step: Callable[[str], None] = lambda _: None) -> ConvertResult:
    """Convert `model` (factory spec or .pt) into a slimmable model stored in `workspace`. `group_multiple`: size
    every channel group to a multiple of this many channels where a set allows (see `passes/group.py`)."""
    step("loading the model")
    module, source = load_model(model, arch=arch, trust_pickle=trust_pickle)
    shape, note = guess_input_shape(module, input_shape)
    notes = [note] if note else []
    dg = analyse_model(module, shape, groups, tuple(leaf_modules), grouped_conv_mode, step=step,
                       group_multiple=group_multiple)
    step("checking full width against the original")
    generator = torch.Generator().manual_seed(REFERENCE_SEED)
    x = torch.randn(2, *shape[1:], generator=generator)
    with torch.no_grad():
        expected = module(x)
        got = convert_to_slimmable(dg).eval()(x)
    error = output_error(got, expected)
    tolerance = FULL_WIDTH_TOLERANCE * output_scale(expected)
    if not error <= tolerance:
        raise InternalError(f"the converted model differs from the original at full width by {error:.3g} "
                            f"(> {tolerance:.3g}): please report this model")
    macs, params = count_macs(dg.gm, shape), count_params(dg.gm)
    step("writing the workspace")
    path = save_workspace(workspace, dg, source, (x, expected), leaf_modules=tuple(leaf_modules),
                          grouped_conv_mode=grouped_conv_mode, macs=macs, params=params)
    coarser = [s for s in dg.free_sets if len(s.groups) < min(groups, s.channels)] if group_multiple > 1 else []
    if coarser:
        notes.append(f"--group-multiple {group_multiple}: {len(coarser)} of {len(dg.free_sets)} slimmable sets get "
                     f"fewer than {groups} groups (e.g. '{coarser[0].name}': {len(coarser[0].groups)} groups of "
                     f"{coarser[0].group_channels})")
    for s in dg.sets:
        if s.free and len(set(s.group_channels)) > 1:
            notes.append(f"set '{s.name}': {s.channels} channels do not split evenly into {len(s.groups)} groups "
                         f"(sizes {s.group_channels})")
    return ConvertResult(path, source, dg, macs, params, error, notes)
