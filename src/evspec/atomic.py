"""Write-to-temporary-then-rename, so a killed job never leaves a file that looks done.

Every writer in evspec goes through `atomic_output`: the work happens on a temporary
name beside the final path (same filesystem, so the rename is atomic), and only a
block that finishes without an exception renames it into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from evspec.errors import InputError


# Errors that mean "this place cannot take the output" (full disk, read-only, no permission).
_UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def temporary_sibling(final_path: Path) -> Path:
    """A name beside `final_path` that no other process uses and nothing takes as done."""
    return final_path.with_name(f".{final_path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_output(final_path: str | Path) -> Iterator[Path]:
    """Yield a temporary path for a file or directory; rename it to `final_path` on success.

    On any exception the temporary is removed and `final_path` is left as it was.
    A directory or disk that refuses writes becomes an `InputError` naming the path.
    """
    final_path = Path(final_path)
    temporary = temporary_sibling(final_path)
    try:
        final_path.parent.mkdir(parents=True, exist_ok=True)
        _remove(temporary)
        yield temporary
        if final_path.is_dir() and not final_path.is_symlink():
            shutil.rmtree(final_path)
        os.replace(temporary, final_path)
    except OSError as error:
        _remove(temporary)
        raise unwritable_error(final_path, error) from error
    except BaseException:
        _remove(temporary)
        raise


def unwritable_error(path: Path, error: OSError) -> Exception:
    """An `InputError` naming `path` when the place refuses writes (full, read-only, no permission)."""
    if error.errno in _UNWRITABLE:
        return InputError(path, f"cannot write output: {error.strerror}")
    return error


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
