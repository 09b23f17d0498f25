"""HDF5 helpers shared by every reader and writer: clear errors, one compression and checksum policy.

`hdf5plugin` is imported here, once, because DSEC files use Blosc+ZSTD and h5py can
only decode them after the plugin registered its filters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import h5py
import hdf5plugin

from evspec.errors import InputError


def blosc_zstd() -> hdf5plugin.Blosc:
    """The DSEC event compression (Blosc with ZSTD, byte shuffle)."""
    return hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE)


def lz4_checksummed() -> dict:
    """What evspec's own caches are written with: fast LZ4 compression (tensors are read often) and a
    Fletcher-32 checksum per chunk, which HDF5 verifies on every read, so a flipped byte in a cache is a
    read error naming the file (`open_h5`) instead of different numbers."""
    return {**hdf5plugin.LZ4(), "fletcher32": True}


@contextlib.contextmanager
def open_h5(path: str | Path) -> Iterator[h5py.File]:
    """Open an HDF5 file for reading; a missing, truncated or corrupt file is an `InputError`.

    Errors raised while reading inside the block (a corrupt chunk, a bad filter) are
    wrapped too, so the message always names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise InputError(path, f"not a readable HDF5 file (truncated or corrupt?): {error}") from error
    try:
        with handle:
            yield handle
    except (OSError, RuntimeError) as error:
        raise InputError(path, f"HDF5 read failed (corrupt data?): {error}") from error


def require_dataset(handle: h5py.File, name: str) -> h5py.Dataset:
    """`handle[name]` as a dataset, or an `InputError` naming the file and the missing path."""
    item = handle.get(name)
    if not isinstance(item, h5py.Dataset):
        problem = "is not a dataset" if item is not None else "is missing"
        raise InputError(handle.filename, f"dataset '{name}' {problem}")
    return item
