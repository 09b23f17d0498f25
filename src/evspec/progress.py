"""Progress bars for long stages: tqdm's bar on a terminal, plain dated lines in a rule's log file.

tqdm redraws its bar in place with carriage returns, which fill a log file with one long line
of redraws. When the stream is not a terminal (Snakemake sends each job's stderr to its log),
each update is written as its own line instead, at most one every `LOG_INTERVAL_S` seconds.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # seconds between progress lines in a log file


class _Lines:
    """A stream for tqdm that turns each redraw into one line (the stream is a file, not a terminal)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream, self.last = stream, ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable | None = None, *, stream: IO[str] | None = None, **options: Any) -> tqdm:
    """tqdm over `iterable` (or a manual bar: `total=`), with tqdm's `options`, to `stream` (stderr)."""
    stream = stream or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        options = {**options, "file": _Lines(stream), "mininterval": LOG_INTERVAL_S, "ascii": True}
    else:
        options = {"file": stream, **options}
    return tqdm(iterable, **options)
