"""File helpers every on-disk artefact shares (workspace, graph store, deployables): checksums, atomic and
durable writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from dyncompile.errors import WriteError

__all__ = ["read_json", "sha256_file", "check_checksums", "write_errors", "fsync_path", "replace_durably", "write_atomic",
           "write_atomic_with"]


@contextmanager
def write_errors(what: str | Path, kept: str) -> Iterator[None]:
    """An OSError while writing `what` becomes one line (`WriteError`) saying that `kept` was left as it was."""
    try:
        yield
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise WriteError(f"cannot write '{what}': {reason} (disk full?); {kept}") from None


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_checksums(folder: str | Path, files: dict[str, str], error: type[Exception], *, missing: str,
                    changed: str) -> None:
    """Raise `error` (message templates with {file}) for the first listed file that is missing or changed."""
    for name, digest in files.items():
        file = Path(folder) / name
        if not file.is_file():
            raise error(missing.format(file=file))
        if sha256_file(file) != digest:
            raise error(changed.format(file=file))


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a folder's entries (which makes a rename inside it durable), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(src: str | Path, dst: str | Path) -> None:
    """Flush `src` to disk, then rename it over `dst`: a crash leaves either the old or the new file, whole."""
    fsync_path(src)
    os.replace(src, dst)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic_with(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Let `write` fill a temporary file beside `path` (usual permissions, not mkstemp's 0600), flush it and
    rename it over `path`, then flush the folder: a crash leaves the old file or the new one, whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # some file systems cannot flush a folder; the rename has happened
        fsync_path(path.parent)


def write_atomic(path: str | Path, data: bytes) -> None:
    """`write_atomic_with` for bytes already in memory."""
    write_atomic_with(path, lambda f: f.write(data))


def read_json(path: Path, error: type[Exception], redo: str) -> object:
    """The JSON in `path`; `error` (one line that ends with `redo`, what recreates the file) if it is not JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"'{path}' is not valid JSON ({exc}); {redo}") from None
