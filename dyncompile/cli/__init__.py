"""The `dyncompile` command line: it parses arguments and prints; the work lives in library functions.

One module per part of the journey, each registering its commands on the one typer `app` of `common`:

    common.py    the app, consoles, shared options, friendly_errors (exit 2: user's mistake; 3: a bug)
    convert.py   convert, verify, inspect
    search.py    search
    deploy.py    build, run, bench
    report.py    report
"""

from dyncompile.cli import convert, deploy, report, search  # noqa: F401  (each registers its commands)
from dyncompile.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    app()
