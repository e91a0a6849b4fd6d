"""`dyncompile convert`, `verify` and `inspect`: the conversion half of the command line.

The commands parse and print; the work is in `dyncompile.convert`, `dyncompile.verify`, `dyncompile.inspection`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dyncompile.cli.common import JsonOption, WorkspaceOption, app, console, friendly_errors, out, parse_widths, print_json
from dyncompile.errors import ConfigError, UntrustedPickleError
from dyncompile.workspace import DEFAULT_WORKSPACE

__all__ = ["convert", "verify", "inspect"]


@app.command()
@friendly_errors
def convert(
    model: Annotated[str, typer.Argument(help="package.module:factory, or a .pt file (state dict with --arch, or a "
                                              "pickled module with --trust-pickle).")],
    groups: Annotated[int, typer.Option("--groups", "-g", help="Channel groups per free channel set.")] = 8,
    input_shape: Annotated[str | None, typer.Option(help="Input shape 1,C,H,W (default: the first of 224², 32², "
                                                         "28² grey the model accepts).")] = None,
    workspace: WorkspaceOption = Path(DEFAULT_WORKSPACE),
    leaf: Annotated[list[str] | None, typer.Option("--leaf", help="Submodule (qualified name) to keep opaque: "
                                                                  "not traced, kept at full width. Repeatable.")] = None,
    arch: Annotated[str | None, typer.Option(help="package.module:factory that builds the model for a "
                                                   "state-dict .pt.")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow loading a pickled module: this runs "
                                                                      "code from the file.")] = False,
    grouped_conv: Annotated[str, typer.Option(help="How grouped convs slim: 'group' drops whole conv-groups, "
                                                   "'position' the same channel in every group, 'auto' keeps more "
                                                   "channels free.")] = "auto",
    group_multiple: Annotated[str, typer.Option(help="Size each channel group to a multiple of this many channels "
                                                     "('auto': this CPU's vector lanes, 16 on AVX-512), so sub-nets "
                                                     "fill the vector registers; narrow sets get fewer groups.")] = "1",
    json_output: JsonOption = False,
) -> None:
    """Trace MODEL, find coupled channels, split them into groups, and save a slimmable model in a workspace."""
    from dyncompile.convert import convert as run_convert
    from dyncompile.convert import parse_group_multiple
    from dyncompile.loading import parse_input_shape
    from dyncompile.passes.couple import GROUPED_CONV_MODES

    if grouped_conv not in GROUPED_CONV_MODES:
        raise ConfigError(f"--grouped-conv must be one of {', '.join(GROUPED_CONV_MODES)}")
    shape = parse_input_shape(input_shape) if input_shape else None
    multiple = parse_group_multiple(group_multiple)

    def attempt(trust: bool):
        with console.status("converting…") as status:
            return run_convert(model, workspace=workspace, groups=groups, input_shape=shape,
                               leaf_modules=tuple(leaf or ()), arch=arch, trust_pickle=trust,
                               grouped_conv_mode=grouped_conv, group_multiple=multiple,
                               step=lambda s: status.update(f"converting: {s}…"))

    try:
        result = attempt(trust_pickle)
    except UntrustedPickleError as exc:
        # At a terminal, ask: answering yes is the explicit opt-in. Scripts (no terminal) get the one-line error.
        if json_output or not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise
        console.print(f"[yellow]{exc}[/]", highlight=False, soft_wrap=True)
        if not typer.confirm(f"Load '{model}' and run its code?", default=False, err=True):
            raise
        result = attempt(True)
    if json_output:
        print_json(result.to_json())
        return
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    dg = result.dg
    out.print(f"[bold green]converted[/] {model} → {result.workspace}  "
              f"(input {','.join(map(str, dg.input_shape))}, {dg.trace_mode} trace, "
              f"{result.macs / 1e6:.1f} MMACs, {result.params / 1e6:.2f} M params)", highlight=False)
    out.print(f"{len(dg.free_sets)} of {len(dg.sets)} channel sets are slimmable into ≤{dg.num_groups} groups; "
              f"full width matches the original (max error {result.full_width_error:.2g}).")
    out.print("Next: [bold]dyncompile verify[/] checks every width; [bold]dyncompile inspect[/] shows the couplings.")


@app.command()
@friendly_errors
def verify(
    workspace: WorkspaceOption = Path(DEFAULT_WORKSPACE),
    widths: Annotated[str, typer.Option(help="Uniform widths to check (each set keeps ceil(w·G) groups).")] = "1.0,0.75,0.5,0.25",
    json_output: JsonOption = False,
) -> None:
    """Check the guarantees at each width: exact at full width, extracted sub-nets equal the masked model."""
    from rich.progress import Progress

    from dyncompile.verify import verify as run_verify
    from dyncompile.workspace import load_workspace

    width_list = parse_widths(widths)
    with console.status("opening the workspace…"):
        ws = load_workspace(workspace)
    reports = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("verifying", total=len(width_list))
        for w in width_list:
            progress.update(task, description=f"verifying width {w}")
            reports += run_verify(ws.dg, [w], reference=ws.reference)
            progress.advance(task)
    ok = all(r.ok for r in reports)
    if json_output:
        for r in reports:
            sys.stdout.write(json.dumps(r.to_json()) + "\n")
    else:
        table = Table(title=f"dyncompile verify — {ws.path}")
        for col in ("width", "MMACs", "MACs %", "params", "full-width err", "extract err", "ok"):
            table.add_column(col, justify="right")
        for r in reports:
            table.add_row(f"{r.width:g}", f"{r.macs / 1e6:.2f}", f"{100 * r.macs_fraction:.1f}", f"{r.params:,}",
                          "" if r.full_width_error is None else f"{r.full_width_error:.2g}", f"{r.extract_error:.2g}",
                          "[green]yes[/]" if r.ok else "[red]NO[/]")
        out.print(table)
        for r in reports:
            for p in r.problems:
                console.print(f"[red]width {r.width:g}:[/] {p}", highlight=False)
    if not ok:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def inspect(workspace: WorkspaceOption = Path(DEFAULT_WORKSPACE), json_output: JsonOption = False) -> None:
    """Show the channel sets (couplings), their groups, what is kept at full width and why, and MACs."""
    from dyncompile.inspection import inspect_workspace

    report = inspect_workspace(workspace)
    if json_output:
        print_json(report)
        return
    out.print(f"[bold]{report['model']['location']}[/] ({report['model']['kind']}), input "
              f"{','.join(map(str, report['input_shape']))}, {report['trace_mode']} trace, {report['groups']} groups, "
              f"{report['macs'] / 1e6:.2f} MMACs, {report['params']:,} params", highlight=False)
    sets = Table(title="channel sets (channels kept or dropped together)")
    sets.add_column("set", no_wrap=True)
    for col in ("channels", "groups", "channels per group", "producers", "fixed ch."):
        sets.add_column(col, justify="right")
    for s in report["sets"]:
        sizes = s["group_channels"]
        per_group = f"{len(sizes)} × {sizes[0]}" if sizes and len(set(sizes)) == 1 else " ".join(map(str, sizes))
        sets.add_row(s["name"], str(s["channels"]), str(s["groups"]) if s["free"] else "[yellow]fixed[/]",
                     per_group if s["free"] else "", str(len(s["producers"])), str(s["fixed_channels"]))
    out.print(sets)
    widths = Table(title="uniform widths")
    for col in ("width", "MMACs", "MACs %", "params"):
        widths.add_column(col, justify="right")
    for w in report["widths"]:
        widths.add_row(f"{w['width']:g}", f"{w['macs'] / 1e6:.2f}", f"{100 * w['macs_fraction']:.1f}", f"{w['params']:,}")
    out.print(widths)
    if report["fixed_reasons"]:
        out.print("[bold]kept at full width[/]:")
        for why in report["fixed_reasons"]:
            out.print(f"  • {why}", highlight=False)
