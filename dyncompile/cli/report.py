"""`dyncompile report`: registers the command on the CLI app; the work lives in `dyncompile.report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dyncompile.cli.common import JsonOption, WorkspaceOption, app, console, friendly_errors, out, print_json
from dyncompile.workspace import DEFAULT_WORKSPACE


@app.command()
@friendly_errors
def report(
    workspace: WorkspaceOption = Path(DEFAULT_WORKSPACE),
    output: Annotated[Path | None, typer.Option("--output", "-o", help="The HTML file to write (default: "
                                                "<workspace>/report/report.html); plots go beside it as PNG.")] = None,
    json_output: JsonOption = False,
) -> None:
    """Write one self-contained HTML page: sub-nets' accuracy vs MACs and latency, widths, search history, builds."""
    from dyncompile.report import make_report

    with console.status("writing the report…"):
        result = make_report(workspace, output)
    if json_output:
        print_json(result.to_json())
        return
    for line in result.missing:
        console.print(f"[yellow]note:[/] {line}", highlight=False, soft_wrap=True)
    out.print(f"[bold green]report[/] {result.html}  ({len(result.plots)} plots beside it)", highlight=False)
    out.print(f"Open it in a browser: file://{result.html.resolve()}", highlight=False, soft_wrap=True)
