"""What every command module of the CLI shares: the typer `app`, the consoles, common options, and
`friendly_errors` (one red line for a user's mistake, exit 2; one line asking for a bug report, exit 3).

Command modules import the library inside each command: torch and TVM take seconds to import, and `--help`,
`--version` or a mistyped option should answer at once.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

import dyncompile
from dyncompile.errors import ConfigError, DyncompileError, one_line

app = typer.Typer(
    name="dyncompile",
    help="Give a trained static CNN run-time dynamic inference: convert it into nested, switchable sub-networks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _console(stderr: bool) -> Console:
    """Rich draws 80 columns wide when the stream is no terminal (CI logs, `| tee`), which cuts table cells to
    '…'; a log has room, so draw 160 wide there unless COLUMNS says otherwise."""
    stream = sys.stderr if stderr else sys.stdout
    wide = not (hasattr(stream, "isatty") and stream.isatty()) and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=160 if wide else None)


console = _console(stderr=True)
out = _console(stderr=False)


def versions() -> dict[str, str]:
    """dyncompile's version and those of the two libraries a deployable depends on (what a bug report needs)."""
    found = {"dyncompile": dyncompile.__version__}
    for package in ("torch", "apache-tvm", "apache-tvm-ffi"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def _print_version(value: bool) -> None:
    if value:
        out.print("  ".join(f"{name} {v}" for name, v in versions().items()), highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the versions of dyncompile, torch and TVM, then exit.")] = False,
) -> None:
    """Give a trained static CNN run-time dynamic inference: convert it into nested, switchable sub-networks."""

WorkspaceOption = Annotated[Path, typer.Option("--workspace", "-w", help="Workspace folder (made by convert).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def friendly_errors(command: Callable) -> Callable:
    """User mistakes become one red line and exit code 2; bugs one line and exit code 3 (traceback on request)."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DyncompileError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # noqa: BLE001
            if os.environ.get("DYNCOMPILE_DEBUG"):
                raise
            console.print(f"[bold red]internal error:[/] {one_line(exc)} "
                          f"(a dyncompile bug: set DYNCOMPILE_DEBUG=1 for the traceback and report it)",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(3) from None

    return wrapper


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=None if isinstance(obj, list) else 1) + "\n")


def parse_widths(text: str) -> list[float]:
    try:
        widths = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"--widths '{text}' must be numbers like 1.0,0.5,0.25") from None
    if not widths or any(not 0 < w <= 1 for w in widths):
        raise ConfigError(f"--widths '{text}' must be in (0, 1], like 1.0,0.5,0.25")
    return widths
