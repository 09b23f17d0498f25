"""Readers for the three event formats evspec meets: DSEC HDF5, EventGPT .npy, N-ImageNet .npz.

Each returns `Events` (absolute int64 microseconds) after `check_events`, or raises an
`InputError` naming the file and the problem. None of them executes pickled code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from evspec.errors import InputError
from evspec.events.types import Events, check_events, check_sorted
from evspec.h5 import open_h5, require_dataset

DSEC_HEIGHT, DSEC_WIDTH = 480, 640


def read_dsec_window(
    h5_path: str | Path,
    t_start_us: int,
    t_end_us: int,
    *,
    height: int | None = None,
    width: int | None = None,
) -> Events:
    """Events with t_start_us <= t < t_end_us from a DSEC `events.h5`, t on the image clock.

    Only the slice found through `/ms_to_idx` is read, never the whole file.
    Invariant of `/ms_to_idx`: entry m is the index of the first event with relative
    t >= 1000*m; e.g. ms_to_idx[3] = 7 means events 0..6 happened before 3 ms.
    Sensor size: `height`/`width` if given, else the file's `/events` attributes
    (synthetic files carry them), else DSEC's 480x640.
    """
    if t_end_us <= t_start_us:
        raise InputError(h5_path, f"empty time window [{t_start_us}, {t_end_us}) us")
    with open_h5(h5_path) as handle:
        x_ds, y_ds, t_ds, p_ds = (require_dataset(handle, f"events/{name}") for name in "xytp")
        ms_to_idx = require_dataset(handle, "ms_to_idx")
        t_offset_us = int(require_dataset(handle, "t_offset")[()])
        height = height or int(handle["events"].attrs.get("height", DSEC_HEIGHT))
        width = width or int(handle["events"].attrs.get("width", DSEC_WIDTH))
        n_events, n_ms = t_ds.shape[0], ms_to_idx.shape[0]

        start_rel_us, end_rel_us = t_start_us - t_offset_us, t_end_us - t_offset_us
        if start_rel_us < 0 or end_rel_us > n_ms * 1000:
            raise InputError(
                h5_path,
                f"window [{t_start_us}, {t_end_us}) us lies outside the recording "
                f"[{t_offset_us}, {t_offset_us + n_ms * 1000}) us",
            )
        # 1. Coarse index range from whole milliseconds that surely covers the window.
        first_ms, last_ms = start_rel_us // 1000, -(-end_rel_us // 1000)
        lo = int(ms_to_idx[first_ms])
        hi = int(ms_to_idx[last_ms]) if last_ms < n_ms else n_events
        if not 0 <= lo <= hi <= n_events:
            raise InputError(h5_path, f"ms_to_idx is inconsistent: [{lo}, {hi}) for {n_events} events")
        t_coarse = t_ds[lo:hi].astype(np.int64)
        check_sorted(h5_path, t_coarse, first_index=lo)
        _check_ms_index(h5_path, t_ds, lo, first_ms, t_coarse[:1])
        # 2. Exact bounds inside the coarse slice (half-open: t == end is excluded).
        a = lo + int(np.searchsorted(t_coarse, start_rel_us, side="left"))
        b = lo + int(np.searchsorted(t_coarse, end_rel_us, side="left"))
        x, y, p = x_ds[a:b], y_ds[a:b], p_ds[a:b]
        t = t_coarse[a - lo : b - lo] + t_offset_us
    check_events(h5_path, x, y, t, p, height=height, width=width)
    return Events.from_arrays(x, y, t, p)


def _check_ms_index(h5_path: str | Path, t_ds, index: int, ms: int, t_at_index: np.ndarray) -> None:
    """Refuse a `/ms_to_idx` entry that does not point at the first event at or after `ms`."""
    boundary_us = ms * 1000
    if t_at_index.size and t_at_index[0] < boundary_us:
        raise InputError(h5_path, f"ms_to_idx[{ms}]={index} points at an event before {boundary_us} us")
    if index > 0 and int(t_ds[index - 1]) >= boundary_us:
        raise InputError(h5_path, f"ms_to_idx[{ms}]={index} skips events at or after {boundary_us} us")


class _NumpyArraysOnly(pickle.Unpickler):
    """Unpickles NumPy arrays, dtypes and plain containers; refuses every other global.

    EventGPT's samples are `np.save`d 0-d object arrays wrapping a dict of arrays;
    their pickle stream names exactly these globals and nothing else.
    """

    def find_class(self, module: str, name: str):
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}:
            return _reconstruct
        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")}:
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}': only NumPy arrays are allowed")


def _reconstruct(subtype: type, shape: tuple, dtype_code: bytes) -> np.ndarray:
    """Safe stand-in for numpy's `_reconstruct`: only plain ndarrays may be built."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing to build array subtype {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


def read_eventgpt_npy(path: str | Path) -> Events:
    """Events from an EventGPT sample `.npy` (a pickled dict with keys x, y, t, p).

    Uses a restricted unpickler: only NumPy arrays and dtypes can be built, so a file
    that tries to run code is refused with an `InputError` instead of executed.
    Times stay relative to the window start, as the file stores them.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    raw = path.read_bytes()
    stream = io.BytesIO(raw)
    try:
        major, _minor = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = read_header(stream)
    except ValueError as error:
        raise InputError(path, f"not a .npy file: {error}") from error
    if dtype != np.dtype(object) or shape != ():
        raise InputError(path, f"expected a pickled dict (0-d object array), found dtype {dtype} shape {shape}")
    try:
        wrapper = _NumpyArraysOnly(stream).load()
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as error:
        raise InputError(path, f"cannot load safely: {error}") from error
    sample = wrapper.item() if isinstance(wrapper, np.ndarray) else wrapper
    if not isinstance(sample, dict) or not {"x", "y", "t", "p"} <= sample.keys():
        keys = sorted(sample) if isinstance(sample, dict) else type(sample).__name__
        raise InputError(path, f"expected a dict with keys x, y, t, p; found {keys}")
    x, y, t, p = (np.asarray(sample[key]) for key in "xytp")
    check_events(path, x, y, t, p, height=None, width=None)
    return Events.from_arrays(x, y, t, p)


def read_nimagenet_npz(path: str | Path, *, height: int = 480, width: int = 640) -> Events:
    """Events from an N-ImageNet `.npz` (structured array `event_data` with x, y, t, p).

    Polarity stored as -1/1 or bool is mapped to 0/1. Loaded with allow_pickle=False.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "event_data" not in archive.files:
                raise InputError(path, f"array 'event_data' is missing (found {archive.files})")
            data = archive["event_data"]
    except (OSError, ValueError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(path, f"not a readable .npz file: {error}") from error
    missing = {"x", "y", "t", "p"} - set(data.dtype.names or ())
    if missing:
        raise InputError(path, f"event_data lacks fields {sorted(missing)}")
    p = (np.asarray(data["p"]) > 0).astype(np.uint8)
    x, y, t = (np.asarray(data[key]) for key in "xyt")
    check_events(path, x, y, t, p, height=height, width=width)
    return Events.from_arrays(x, y, t, p)
