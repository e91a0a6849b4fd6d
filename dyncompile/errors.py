"""Errors a user can fix. The CLI prints them as one red line (no traceback) and exits non-zero."""


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
