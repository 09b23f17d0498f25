"""Writers leave either the complete output or nothing, and say why when they cannot write."""

from __future__ import annotations

import errno
import os

import pytest

from evspec.atomic import atomic_output
from evspec.errors import InputError


def test_failure_leaves_previous_output_untouched(tmp_path):
    final = tmp_path / "out.txt"
    final.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(final) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed midway")
    assert final.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_success_renames_file_and_directory(tmp_path):
    with atomic_output(tmp_path / "dir") as temporary:
        temporary.mkdir()
        (temporary / "a").write_text("x")
    assert (tmp_path / "dir" / "a").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_is_a_clear_error(tmp_path, code):
    final = tmp_path / "out.h5"
    with pytest.raises(InputError, match=f"out.h5: cannot write output: {os.strerror(code)}"):
        with atomic_output(final) as temporary:
            temporary.write_text("partial")
            raise OSError(code, os.strerror(code))
    assert list(tmp_path.iterdir()) == []
