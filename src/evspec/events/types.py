"""`Events`: the one in-memory form of an event stream, and the checks every reader applies.

Whatever the file format, a reader returns `Events` with x, y as uint16 pixel
coordinates, t as int64 microseconds (absolute on the recording's clock) and p as
uint8 polarity in {0, 1} (1 = brightness increase). Readers call `check_events` so
that no downstream code ever sees unsorted times or off-sensor pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evspec.errors import InputError


@dataclass(frozen=True)
class Events:
    """A time-sorted event stream: parallel arrays, one entry per event."""

    x: np.ndarray  # uint16 [N], column
    y: np.ndarray  # uint16 [N], row
    t: np.ndarray  # int64 [N], microseconds, non-decreasing
    p: np.ndarray  # uint8 [N], 0 = darker, 1 = brighter

    def __len__(self) -> int:
        return int(self.t.shape[0])

    @classmethod
    def from_arrays(cls, x: np.ndarray, y: np.ndarray, t: np.ndarray, p: np.ndarray) -> Events:
        """Cast to the canonical dtypes (copies only where a cast is needed)."""
        return cls(
            x=np.asarray(x, dtype=np.uint16),
            y=np.asarray(y, dtype=np.uint16),
            t=np.asarray(t, dtype=np.int64),
            p=np.asarray(p, dtype=np.uint8),
        )

    def slice(self, start: int, stop: int) -> Events:
        """Events [start, stop) by index, as views."""
        return Events(self.x[start:stop], self.y[start:stop], self.t[start:stop], self.p[start:stop])

    def since(self, t_us: int) -> Events:
        """The events at or after `t_us` (the stream is time-sorted), as views."""
        return self.slice(int(np.searchsorted(self.t, t_us, side="left")), len(self))

    @property
    def duration_us(self) -> int:
        return int(self.t[-1] - self.t[0]) if len(self) else 0


def check_events(
    source: str | Path,
    x: np.ndarray,
    y: np.ndarray,
    t: np.ndarray,
    p: np.ndarray,
    *,
    height: int | None,
    width: int | None,
) -> None:
    """Raise `InputError` naming `source` if the arrays are not a valid event stream.

    Valid: equal lengths, t non-decreasing, p in {0, 1}, and (when the sensor size is
    known) 0 <= x < width and 0 <= y < height. The first offending index is reported.
    """
    lengths = {len(x), len(y), len(t), len(p)}
    if len(lengths) != 1:
        raise InputError(source, f"x, y, t, p have different lengths {len(x)}, {len(y)}, {len(t)}, {len(p)}")
    if len(t) == 0:
        return
    check_sorted(source, t)
    bad_polarity = np.flatnonzero(p > 1)
    if bad_polarity.size:
        i = int(bad_polarity[0])
        raise InputError(source, f"polarity must be 0 or 1, found p[{i}]={p[i]}")
    for name, values, limit in (("x", x, width), ("y", y, height)):
        outside = values < 0 if limit is None else (values < 0) | (values >= limit)
        first = np.flatnonzero(outside)
        if first.size:
            i = int(first[0])
            sensor = f"the {width}x{height} sensor" if limit is not None else "the sensor"
            raise InputError(source, f"event {i} lies outside {sensor}: {name}={values[i]}")


def check_sorted(source: str | Path, t: np.ndarray, *, first_index: int = 0) -> None:
    """Raise `InputError` at the first event whose time is earlier than its predecessor's.

    `first_index` is the file index of t[0], so the message points into the file.
    """
    backwards = np.flatnonzero(np.diff(t) < 0)
    if backwards.size:
        i = int(backwards[0]) + 1
        raise InputError(
            source,
            f"event times are not sorted: t[{first_index + i}]={t[i]} < t[{first_index + i - 1}]={t[i - 1]}",
        )
