"""`dyncompile search`: the command-line face of `dyncompile.search` (parsing, progress, tables)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dyncompile.cli.common import JsonOption, WorkspaceOption, app, console, friendly_errors, out, print_json
from dyncompile.errors import ConfigError
from dyncompile.search.methods import SEARCH_METHODS
from dyncompile.search.result import result_dir
from dyncompile.search.run import SearchOptions, run_search
from dyncompile.search.train import Processes
from dyncompile.workspace import DEFAULT_WORKSPACE

__all__ = ["search"]


def _parse_budgets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--subnets '{text}' must be MACs fractions like 0.25,0.5,0.75,1.0") from None
    return values


class _LiveProgress:
    """Draws the search's progress callbacks: one bar per training run, a status line for the search."""

    def __init__(self, progress: Progress | None, quiet: bool, header: str):
        self.progress = progress
        self.quiet = quiet
        self.header = header
        self.tasks: dict[str, int] = {}
        self.search_task = None

    def __call__(self, kind: str, **info) -> None:
        p = self.progress
        if p is None:
            return
        if kind == "start" and not self.quiet:  # after the workspace and data opened: a missing one is one line
            p.console.print(self.header, highlight=False)
            for note in info["notes"]:
                p.console.print(f"[dim]data: {note}[/]", highlight=False)
        elif kind == "train":
            task = self.tasks.get(info["id"])
            if task is None:
                task = self.tasks[info["id"]] = p.add_task(info["label"], total=info["total"])
            sub = f", sub-net {100 * info['macs'][0]:.0f}% MACs" if info.get("macs") else ""
            p.update(task, completed=info["step"], description=f"{info['label']} (loss {info['loss']:.3f}{sub})")
        elif kind == "search":
            if self.search_task is None:
                self.search_task = p.add_task("search", total=None)
            p.update(self.search_task, description=f"search step {info['step']}: without a group of "
                                                   f"{info['candidate']} → {100 * info['macs']:.1f}% MACs, "
                                                   f"{100 * info['accuracy']:.1f}%")
        elif kind == "event" and not self.quiet:
            line = _event_line(info)
            if line:
                p.console.print(line, highlight=False)


def _event_line(e: dict) -> str | None:
    kind = e["event"]
    if kind == "measure":
        return f"model as given: test {100 * e['test_accuracy']:.2f}%"
    if kind == "note":
        return f"[yellow]note:[/] {e['text']}"
    if kind == "train-full":
        return f"trained at full width: {e['epochs']:g} epochs, search split {100 * e['search_accuracy']:.2f}%"
    if kind == "rank":
        return f"ranked channel groups ({e['rank']}, {e['direction']})"
    if kind == "search-start":
        return f"search starts: full model {100 * e['search_accuracy']:.2f}% on the search split, fine-tune below {100 * e['threshold']:.2f}%"
    if kind == "step":
        return (f"step {e['step']:3d}: dropped a group of {e['dropped']} → {100 * e['macs_fraction']:5.1f}% MACs, "
                f"{100 * e['accuracy']:.2f}%")
    if kind == "finetune":
        return (f"fine-tuned step {e['step']}: {100 * e['before']:.2f}% → {100 * e['after']:.2f}% "
                f"({e['epochs']:g} epochs)")
    if kind == "select":
        return "re-selection done"
    return None


@app.command()
@friendly_errors
def search(
    workspace: WorkspaceOption = Path(DEFAULT_WORKSPACE),
    data: Annotated[str, typer.Option(help="Dataset folder (IDX, CIFAR-10 python batches, ImageFolder) or a known "
                                           "name: fashion-mnist.")] = "fashion-mnist",
    subnets: Annotated[str, typer.Option(help="Sub-nets to choose, as MACs fractions of the full model.")] = "0.25,0.5,0.75,1.0",
    method: Annotated[str, typer.Option(help="; ".join(f"{m.name}: {m.summary}"
                                                      for m in SEARCH_METHODS.values()) + ".")] = "progressive",
    epochs: Annotated[float, typer.Option(help="Epochs of the final multi-sub-net training (US-Nets: its training).")] = 5.0,
    batch_size: Annotated[int, typer.Option(help="Training batch size (over all processes).")] = 128,
    lr: Annotated[float, typer.Option(help="Learning rate of the multi-sub-net training (cosine decay; the model "
                                           "arrives trained, so a fine-tuning rate).")] = 0.01,
    seed: Annotated[int, typer.Option(help="Seed of the data split, order and every random draw.")] = 0,
    train_limit: Annotated[int | None, typer.Option(help="Train on this many images (a fixed subset).")] = None,
    val_limit: Annotated[int | None, typer.Option(help="Validate on this many test images (a fixed subset).")] = None,
    train_full: Annotated[float | None, typer.Option(help="Epochs at full width before the search (default: only "
                                                          "when the model scores at chance).")] = None,
    rank: Annotated[str | None, typer.Option(help="Channel-group ranking: noise (trainable noise scales), l1, "
                                                     "or none (convert's order). Default: noise for progressive, "
                                                     "none for usnet (its published recipe).")] = None,
    rank_direction: Annotated[str, typer.Option(help="tolerant-first drops the group that tolerates the most noise "
                                                     "(or has the smallest L1) first; sensitive-first reverses.")] = "tolerant-first",
    noise_epochs: Annotated[float, typer.Option(help="Epochs of the noise-ranking pass.")] = 1.0,
    noise_init: Annotated[float, typer.Option(help="Initial noise scale per group (0 or 0.25 in the paper's spirit).")] = 0.25,
    floor: Annotated[float, typer.Option(help="Smallest fraction of a set's channels the search may keep.")] = 0.25,
    greedy: Annotated[str, typer.Option(help="lazy: each step re-scores only the sets whose last score could win "
                                             "(a few evaluations a step, whatever the number of sets); "
                                             "exhaustive: each step scores every set (the paper).")] = "lazy",
    lazy_scores: Annotated[int, typer.Option(help="lazy: at most this many re-scored sets a step, besides new "
                                                  "ones and the oldest score.")] = 4,
    finetune_threshold: Annotated[float, typer.Option(help="Fine-tune when search accuracy falls below: full "
                                                           "accuracy minus this (--threshold-mode drop) or this "
                                                           "accuracy (absolute).")] = 0.05,
    threshold_mode: Annotated[str, typer.Option(help="drop or absolute.")] = "drop",
    finetune_epochs: Annotated[float, typer.Option(help="Epoch cap of one fine-tune.")] = 1.0,
    finetune_check_images: Annotated[int, typer.Option(help="Training images between a fine-tune's accuracy checks "
                                                            "(it stops once back over the threshold).")] = 512,
    tolerance: Annotated[float, typer.Option(help="Re-selection window below each budget (MACs fraction).")] = 0.05,
    budget_window: Annotated[str, typer.Option(help="under: a budget is a cap, pick within [budget - tolerance, "
                                                    "budget], never over; around: within budget ± tolerance (the "
                                                    "paper).")] = "under",
    select_z: Annotated[float, typer.Option(help="A candidate counts as less accurate only when it is this many "
                                                 "standard errors worse on the search split (paired); within that "
                                                 "noise the larger one is kept. 0: any difference counts.")] = 2.0,
    joint_pool: Annotated[str, typer.Option(help="Joint training's middle sub-nets: chosen (what ships) or chain "
                                                 "(the whole filtered chain).")] = "chosen",
    remeasure: Annotated[bool, typer.Option(help="Re-measure every candidate a budget can choose before filtering "
                                                 "(fine-tunes after a step change its accuracy).")] = True,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted search from its checkpoint.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Discard an interrupted search's checkpoint.")] = False,
    checkpoint_every: Annotated[float, typer.Option("--checkpoint-every", hidden=True,
                                                    help="Seconds between checkpoints inside training.")] = 60.0,
    json_output: JsonOption = False,
) -> None:
    """Choose nested sub-nets by training on real data: the progressive search, or the US-Nets baseline."""
    options = SearchOptions(method=method, data=data, subnets=_parse_budgets(subnets), epochs=epochs,
                            batch_size=batch_size, lr=lr, seed=seed, train_limit=train_limit, val_limit=val_limit,
                            train_full=train_full, rank=rank, rank_direction=rank_direction, noise_epochs=noise_epochs,
                            noise_init=noise_init, floor=floor, greedy=greedy, lazy_scores=lazy_scores,
                            finetune_threshold=finetune_threshold,
                            threshold_mode=threshold_mode, finetune_epochs=finetune_epochs,
                            finetune_check_images=finetune_check_images, tolerance=tolerance,
                            budget_window=budget_window, select_z=select_z, joint_pool=joint_pool, remeasure_chain=remeasure,
                            checkpoint_every_s=checkpoint_every)
    procs = Processes.from_environment()
    show = procs.main  # under torchrun only rank 0 draws and prints
    header = (f"[bold]dyncompile search[/] --method {method}: {epochs:g} epochs, batch {batch_size}, data {data}"
              + (f" ({train_limit} training images)" if train_limit else ""))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not show) as progress:
        live = _LiveProgress(progress if show else None, quiet=json_output, header=header)
        result = run_search(workspace, options, resume=resume, restart=restart, progress=live, procs=procs)
    if not procs.main:
        return
    if json_output:
        print_json({"method": result.method, "workspace": str(workspace), "full_accuracy": result.full_accuracy,
                     "wall_s": result.wall_s,
                     "subnets": [{"name": s.name, "budget": s.budget, "macs": s.macs, "macs_fraction": s.macs_fraction,
                                  "params": s.params, "accuracy": s.accuracy, "search_accuracy": s.search_accuracy,
                                  "config": s.config} for s in result.subnets],
                     "notes": [e["text"] for e in result.history if e["event"] == "note"],
                     "compute": result.compute})
        return
    table = Table(title=f"dyncompile search — {result.method}, {result.wall_s / 60:.1f} min")
    for col in ("sub-net", "budget", "MMACs", "MACs %", "params", "test accuracy"):
        table.add_column(col, justify="right")
    for s in result.subnets:
        table.add_row(s.name, f"{100 * s.budget:.0f}%" if s.budget else "", f"{s.macs / 1e6:.2f}",
                      f"{100 * s.macs_fraction:.1f}", f"{s.params:,}", f"{100 * s.accuracy:.2f}%")
    out.print(table)
    if result.full_accuracy is not None:
        out.print(f"model as given: {100 * result.full_accuracy:.2f}% on the same test images", highlight=False)
    parts = result.compute.get("parts", {})
    if parts:
        out.print("where the time went: " + ", ".join(f"{name} {p['seconds']:.0f} s" for name, p in parts.items()),
                  highlight=False)
    out.print(f"saved in {result_dir(workspace, result.method)}. Next: [bold]dyncompile build --target cpu[/]")
