"""Errors a user can fix, and the one kind that is a dyncompile bug.

The CLI prints a `DyncompileError` as one red line (no traceback) and exits 2; an `InternalError` (or any other
exception) as one line that asks for a bug report, exit 3.
"""


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """`exc` as "Type: first line of its message" (at most `limit` characters of it): TVM's, torch's and the
    exporters' messages run to pages, and every error dyncompile prints is one line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit] if lines else ''}"


class DyncompileError(Exception):
    """Base class: the message is one line that says what went wrong and what to do."""


class ModelLoadError(DyncompileError):
    """The model file, factory or state dict could not be loaded."""


class UntrustedPickleError(ModelLoadError):
    """The file is a pickled module: loading it runs its code, which needs the user's explicit opt-in."""


class TraceError(DyncompileError):
    """torch.fx could not trace the model, even after the fallbacks."""


class WorkspaceError(DyncompileError):
    """A workspace is missing, malformed, or was changed on disk."""


class ConfigError(DyncompileError):
    """A command-line value is out of range or inconsistent with the model."""


class DatasetError(DyncompileError):
    """A dataset folder is unreadable: unrecognised, truncated, inconsistent or unsafe."""


class WriteError(DyncompileError):
    """An output could not be written (disk full, file too large, no permission); the previous one is kept."""


class InternalError(Exception):
    """An invariant of dyncompile's own analysis was broken: a bug to report, never the user's input (exit 3)."""


class ExtractionError(InternalError):
    """A sub-net cannot be cut out (an analysis invariant was broken): a bug, never the user's fault."""
