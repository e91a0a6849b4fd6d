"""Atomic writes: a writer that fails part-way leaves the old file whole and no temporary file behind."""

import os

import pytest

from dyncompile.fileio import write_atomic, write_atomic_with


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "manifest.json"
    write_atomic(path, b"old")

    def half_then_fail(f):
        f.write(b"new, but only ha")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic_with(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_written_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    mask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "report.html", b"<html></html>")
    finally:
        os.umask(mask)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644
