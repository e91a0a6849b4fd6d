"""The library export runs in a forked child: every way it can end comes back as the right exception."""

from __future__ import annotations

import errno
import os
import sys

import pytest

from dyncompile.deployable import DeployableError, _export_in_child


def _write(executable, path):
    with open(path, "w") as f:
        f.write(executable)


def _no_space(executable, path):
    raise OSError(errno.ENOSPC, "No space left on device")


def _llvm_style_exit(executable, path):
    """What LLVM does on a failed object write: a message on stderr, then the process ends."""
    os.write(2, b"LLVM ERROR: IO failure on output stream: File too large\n")
    os._exit(1)


def _abort(executable, path):
    os.write(2, b"something else went wrong\n")
    os.abort()


def _bug(executable, path):
    raise ValueError("unexpected")


def test_success_writes_the_file_in_the_callers_filesystem(tmp_path):
    _export_in_child(_write, "library bytes", tmp_path / "lib.so")
    assert (tmp_path / "lib.so").read_text() == "library bytes"


def test_an_oserror_in_the_child_is_an_oserror_here(tmp_path):
    with pytest.raises(OSError) as info:
        _export_in_child(_no_space, "", tmp_path / "lib.so")
    assert info.value.errno == errno.ENOSPC


def test_a_process_exit_on_a_write_failure_is_an_oserror_not_a_crash(tmp_path, capfd):
    with pytest.raises(OSError, match="File too large") as info:
        _export_in_child(_llvm_style_exit, "", tmp_path / "lib.so")
    assert info.value.errno == errno.ENOSPC
    assert "LLVM ERROR" not in capfd.readouterr().err  # the child's stderr is not replayed on failure


def test_an_abort_is_one_error_naming_the_signal(tmp_path):
    with pytest.raises(DeployableError, match="signal SIGABRT: something else went wrong"):
        _export_in_child(_abort, "", tmp_path / "lib.so")


def test_an_exception_is_a_deployable_error(tmp_path):
    with pytest.raises(DeployableError, match="ValueError: unexpected"):
        _export_in_child(_bug, "", tmp_path / "lib.so")
    assert sys.exc_info() == (None, None, None)
