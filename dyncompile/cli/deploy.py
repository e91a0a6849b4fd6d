"""`dyncompile build`, `run` and `bench`: compile sub-nets into one deployable, run it, measure it.

The commands parse and print; the work is in `dyncompile.build`, `dyncompile.deployable`, `dyncompile.runtime`
and `dyncompile.bench`.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dyncompile.cli.common import JsonOption, WorkspaceOption, app, console, friendly_errors, out, parse_widths, print_json
from dyncompile.errors import ConfigError
from dyncompile.fileio import write_atomic
from dyncompile.targets import get_target
from dyncompile.workspace import DEFAULT_WORKSPACE

__all__ = ["build", "run", "bench"]

RpcOption = Annotated[str | None, typer.Option("--rpc", help="HOST:PORT of a board's TVM RPC server (target arm); "
                                                             "no board yet? scripts/emulated-arm-board start")]
_TRIALS = re.compile(r"^(\d+)/(\d+) trials")


def _target_options(kind, given: dict) -> dict:
    """The CLI options `kind.tvm_target` accepts; a given option it does not take is a one-line error."""
    accepted = inspect.signature(kind.tvm_target).parameters
    options = {k: v for k, v in given.items() if v is not None}
    for key in options:
        if key not in accepted:
            takes = ", ".join(f"--{p.replace('_', '-')}" for p in accepted if p in given) or "none of these"
            raise ConfigError(f"--{key.replace('_', '-')} does not apply to --target {kind.name} (it takes: {takes})")
    return options


def _build_progress():
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console, transient=True)


@app.command()
@friendly_errors
def build(
    target: Annotated[str, typer.Option("--target", "-t", help="cpu (this machine), arm (aarch64 board), cuda.")],
    workspace: WorkspaceOption = Path(DEFAULT_WORKSPACE),
    tune_trials: Annotated[int, typer.Option("--tune-trials", help="MetaSchedule trials per distinct kernel (0: "
                                                                   "untuned). The tuning database in "
                                                                   "<workspace>/tuning/<target> is reused and "
                                                                   "resumed.")] = 0,
    tune_minutes: Annotated[float | None, typer.Option("--tune-minutes", help="Time budget for tuning: the "
                                                                          "heaviest kernels are tuned first, the "
                                                                          "rest keep default schedules (a later "
                                                                          "build resumes them).")] = None,
    rpc: RpcOption = None,
    mcpu: Annotated[str | None, typer.Option("--mcpu", help="CPU to compile for (cpu: this machine's; arm: "
                                                            "cortex-a72).")] = None,
    arch: Annotated[str | None, typer.Option("--arch", help="CUDA architecture (cuda: sm_80).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Deployable folder (default: "
                                                                       "<workspace>/deploy/<target>).")] = None,
    widths: Annotated[str | None, typer.Option("--widths", help="Build these uniform widths instead of the "
                                                                 "searched sub-nets, e.g. 1.0,0.5.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Static batch size of the deployable.")] = 1,
    json_output: JsonOption = False,
) -> None:
    """Compile the workspace's sub-nets for TARGET into one multi-width deployable (one library, weights once)."""
    from dyncompile.build import build_deployable

    options = _target_options(get_target(target), {"mcpu": mcpu, "arch": arch})
    width_list = tuple(parse_widths(widths)) if widths else None
    with _build_progress() as progress:
        subnet_task = progress.add_task("opening the workspace", total=None, note="")
        state = {"imported": 0, "tune_task": None, "printed": []}

        def on_progress(stage: str, message: str) -> None:
            if stage == "note":  # e.g. which sub-nets are built: shown at once, above the progress bar
                state["printed"].append(message)
                if not json_output:
                    console.print(f"[yellow]note:[/] {message}", highlight=False)
                return
            if stage == "subnets":
                progress.update(subnet_task, description="importing sub-nets", total=int(message))
                return
            if stage == "import":
                progress.update(subnet_task, completed=state["imported"], note=f"sub-net {message}")
                state["imported"] += 1
                return
            progress.update(subnet_task, completed=state["imported"])
            trials = _TRIALS.match(message)
            if stage == "tune" and trials:
                done, total = int(trials.group(1)), int(trials.group(2))
                if state["tune_task"] is None:
                    state["tune_task"] = progress.add_task("tuning trials", total=total, note="")
                progress.update(state["tune_task"], completed=done, total=total,
                                note=message.split(" ", 2)[-1].strip("()"))
            else:
                progress.update(subnet_task, description={"workspace": "opening the workspace",
                                                          "write": "writing the deployable",
                                                          "measure": "measuring latency"}.get(stage, stage),
                                note="" if stage in ("write", "measure") else message)

        built = build_deployable(workspace, target=target, target_options=options, output=output, widths=width_list,
                                 batch_size=batch_size, tune_trials=tune_trials, tune_minutes=tune_minutes, rpc=rpc,
                                 progress=on_progress)
    manifest, path, tuning = built.manifest, built.path, built.result.tuning
    if json_output:
        print_json({"deployable": str(path), "target": manifest.target.to_json(),
                     "tuning": None if built.tuning is None else built.tuning.to_json(),
                     "tuned_schedules_kept": built.tuned_schedules_kept,
                     "compile_s": built.result.compile_s, "notes": built.notes,
                     "subnets": [{"name": s.name, "macs": s.macs, "params": s.params, "kernels": s.kernels,
                                  "tuned_kernels": s.tuned_kernels, "latency_ms": s.latency_ms,
                                  "accuracy": s.accuracy} for s in manifest.subnets]})
        return
    for note in built.notes[len(state["printed"]):]:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    full_macs = max(s.macs for s in manifest.subnets)
    table = Table(title=f"dyncompile build --target {target} → {path}")
    for col in ("sub-net", "MMACs", "MACs %", "params", "kernels tuned", "latency ms", "accuracy"):
        table.add_column(col, justify="right")
    for s in manifest.subnets:
        table.add_row(s.name, f"{s.macs / 1e6:.2f}", f"{100 * s.macs / full_macs:.1f}", f"{s.params:,}",
                      f"{s.tuned_kernels}/{s.kernels}",
                      "–" if s.latency_ms is None else f"{s.latency_ms:.3f}",
                      "–" if s.accuracy is None else f"{100 * s.accuracy:.2f}%")
    out.print(table)
    if tuning:
        t = tuning
        out.print(f"tuning: {t.tasks} distinct kernels, {t.tuned} tuned now ({t.trials_per_task} trials each), "
                  f"{t.reused} reused from {t.database}, {t.seconds:.0f} s", highlight=False)
        if t.left_for_time:
            out.print(f"[yellow]note:[/] the {t.time_budget_s / 60:g}-minute budget ran out: {t.left_for_time} kernels "
                      f"keep TVM's default schedules, which are slow on CPUs; the same build again tunes them",
                      highlight=False)
    out.print(f"Next: [bold]dyncompile run {path} --input x.npy[/] or [bold]dyncompile bench {path}[/]",
              highlight=False)


def _save_outputs(path: Path, outputs: tuple) -> None:
    """One output as .npy; several (a detector's) as one .npz holding output_0, output_1, … in order."""
    import io

    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    if len(outputs) == 1:
        np.save(buffer, outputs[0], allow_pickle=False)
    else:
        np.savez(buffer, **{f"output_{i}": y for i, y in enumerate(outputs)})
    write_atomic(path, buffer.getvalue())


def _summary(y) -> str:
    """An output in a few words: its shape, and for a classifier's (batch, classes) logits the top class."""
    import numpy as np

    top = f", argmax per row {np.argmax(y, axis=1).tolist()}" if y.ndim == 2 else ""
    return f"{tuple(y.shape)}{top}"


def _load_npy(path: Path):
    import numpy as np

    if not path.is_file():
        raise ConfigError(f"no input file '{path}' (a .npy array saved with numpy.save)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ConfigError(f"'{path}' is not a .npy array without pickles ({str(exc).splitlines()[0][:80]})") from None


@app.command()
@friendly_errors
def run(
    deployable: Annotated[Path, typer.Argument(help="Deployable folder (from dyncompile build).")],
    input: Annotated[Path, typer.Option("--input", "-i", help="Input batch as a .npy file of the deployable's "
                                                             "input shape.")],
    subnet: Annotated[str | None, typer.Option("--subnet", "-s", help="Sub-net to run (default: the most "
                                                                      "accurate).")] = None,
    budget_ms: Annotated[float | None, typer.Option("--budget-ms", help="Run the most accurate sub-net whose "
                                                                        "measured latency fits.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the output here (.npy; a sub-net "
                                                "with several outputs: .npz of output_0, output_1, …).")] = None,
    rpc: RpcOption = None,
    json_output: JsonOption = False,
) -> None:
    """Run one sub-net of DEPLOYABLE on an input (.npy), chosen by name or by latency budget.

    With --json, "shape", "dtype" and "output" describe the output; for a sub-net with several outputs (a
    detector's) each holds a list, one entry per output in the model's order."""
    from dyncompile import runtime
    from dyncompile.deployable import read_manifest

    if subnet is not None and budget_ms is not None:
        raise ConfigError("give either --subnet or --budget-ms, not both")
    x = _load_npy(input)
    manifest = read_manifest(deployable)
    with runtime.load(deployable, device=manifest.target.device, rpc=rpc) as model:
        name = model.choose(subnet, budget_ms)
        several = len(manifest.subnet(name).outputs) > 1
        if several and output is not None and output.suffix != ".npz":
            raise ConfigError(f"sub-net '{name}' has {len(manifest.subnet(name).outputs)} outputs: give --output a "
                              f".npz path (one array per output)")
        y = model.run(x, subnet=name)
    outputs = y if several else (y,)
    if output is not None:
        _save_outputs(output, outputs)
    record = next(s for s in model.subnets if s.name == name)
    if json_output:
        each = lambda f: [f(y) for y in outputs] if several else f(y)  # noqa: E731
        print_json({"subnet": name, "latency_ms": record.latency_ms, "accuracy": record.accuracy,
                     "shape": each(lambda a: list(a.shape)), "dtype": each(lambda a: str(a.dtype)),
                     "output": None if output is not None else each(lambda a: a.tolist()),
                     "output_file": None if output is None else str(output)})
        return
    out.print(f"sub-net [bold]{name}[/] ({record.macs / 1e6:.2f} MMACs"
              + (f", {record.latency_ms:.3f} ms measured" if record.latency_ms is not None else "") + "): output"
              + ("s " if several else " ") + "; ".join(_summary(a) for a in outputs)
              + (f" → {output}" if output is not None else ""), highlight=False)


@app.command()
@friendly_errors
def bench(
    deployable: Annotated[Path, typer.Argument(help="Deployable folder (from dyncompile build).")],
    rpc: RpcOption = None,
    compare: Annotated[str | None, typer.Option("--compare", help="Also time the same sub-nets in these engines, "
                                                                  "interleaved: onnxruntime,torch, or none "
                                                                  "(default: onnxruntime when installed and the "
                                                                  "deployable runs here).")] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed calls per sub-net and engine (median).")] = 50,
    workspace: Annotated[Path | None, typer.Option("--workspace", "-w", help="Workspace the deployable was built "
                                                                             "from (default: the one it "
                                                                             "records).")] = None,
    record: Annotated[bool, typer.Option(help="Store the measured latencies in the manifest (budget "
                                              "selection uses them).")] = True,
    json_output: JsonOption = False,
) -> None:
    """Per sub-net median latency and max error against PyTorch, beside ONNX Runtime (and PyTorch with --compare)."""
    from dyncompile.bench import bench_deployable, default_compare
    from dyncompile.deployable import read_manifest, record_latencies

    manifest = read_manifest(deployable)
    if compare is None:
        engines = default_compare(manifest.target.device, rpc)
    else:
        engines = tuple(e.strip() for e in compare.split(",") if e.strip() and e.strip() != "none")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(manifest.subnets))

        done = [0]

        def advance(name: str) -> None:
            progress.update(task, description=f"benchmarking {name}", completed=done[0])
            done[0] += 1

        rows = bench_deployable(deployable, workspace=workspace, rpc=rpc, compare=engines, repeats=repeats,
                                progress=advance, best_effort=compare is None)
    if record:
        where = f"board at {rpc}" if rpc else "this machine"
        record_latencies(deployable, {r.name: r.tvm_ms for r in rows},
                         how={"where": where, "statistic": "median", "repeats": repeats, "warmup": 3,
                              "batch": manifest.input.batch_size, "by": "dyncompile bench",
                              "peers": list(engines)},
                         peers={r.name: r.compare_ms for r in rows})
    if json_output:
        print_json([r.to_json() for r in rows])
        return
    table = Table(title=f"dyncompile bench {deployable} ({manifest.target.name}, batch "
                        f"{manifest.input.batch_size}, median of {repeats})")
    for col in ("sub-net", "MMACs", "TVM ms", "GFLOP/s", "max err vs PyTorch",
                *[f"{e} ms" for e in engines], *[f"TVM/{e}" for e in engines]):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.name, f"{r.macs / 1e6:.2f}", f"{r.tvm_ms:.3f}", f"{r.gflops:.1f}", f"{r.max_error:.2g}",
                      *[f"{r.compare_ms[e]:.3f}" if e in r.compare_ms else "–" for e in engines],
                      *[f"{r.tvm_ms / r.compare_ms[e]:.2f}" if e in r.compare_ms else "–" for e in engines])
    out.print(table)
    for r in rows:
        for engine, why in r.compare_failed.items():
            console.print(f"[yellow]note:[/] {engine} could not run sub-net {r.name} ({why})", highlight=False,
                          soft_wrap=True)
    if record:
        out.print(f"latencies recorded in {deployable}/manifest.json (used by --budget-ms)", highlight=False)
