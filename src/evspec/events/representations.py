"""Event representations: EventGPT's polarity images, a polarity histogram, a voxel grid.

Pure functions: they never modify their input. The inner loops are numba kernels
(one pass over the events, in time order) because the draft's input must be
bit-exact with the authors' per-event rule and still run at hundreds of millions of
events per second; `benchmarks/events.py` measures them against a naive loop.
"""

from __future__ import annotations

import numba
import numpy as np

from evspec.events.types import Events

WHITE = 255
# EventGPT's colours: p=1 (brighter) red, p=0 (darker) blue, on white.
POLARITY_RGB = np.array([[0, 0, 255], [255, 0, 0]], dtype=np.uint8)


def chunk_bounds(n_events: int, n_chunks: int) -> np.ndarray:
    """Start indices of `n_chunks` equal-event-count chunks plus the end: shape [n_chunks + 1].

    Chunk i is [bounds[i], bounds[i+1]); every chunk holds n_events // n_chunks events
    and the last one also takes the remainder, as in EventGPT's loader.
    E.g. 12 events in 5 chunks -> sizes 2, 2, 2, 2, 4.
    """
    if n_events < n_chunks:
        raise ValueError(f"{n_events} events cannot fill {n_chunks} equal-count chunks")
    size = n_events // n_chunks
    bounds = np.arange(n_chunks + 1, dtype=np.int64) * size
    bounds[-1] = n_events
    return bounds


def chunk_canvas_sizes(events: Events, n_images: int = 5) -> list[tuple[int, int]]:
    """(height, width) per chunk under the authors' rule: (max y + 1, max x + 1) of its own events."""
    bounds = chunk_bounds(len(events), n_images)
    return [
        (int(events.y[a:b].max()) + 1, int(events.x[a:b].max()) + 1)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def eventgpt_images(
    events: Events, n_images: int = 5, height: int | None = None, width: int | None = None
) -> np.ndarray:
    """EventGPT's input images: uint8 [n_images, H, W, 3].

    The events are split into `n_images` equal-count chunks (`chunk_bounds`); each chunk
    is drawn on white, a pixel hit with p=0 blue (0,0,255), with p=1 red (255,0,0), and
    where several events hit a pixel the last in time wins.
    With `height`/`width` given the canvas is sensor-sized. With both None the canvas
    follows the authors' rule, (max y + 1, max x + 1) of each chunk's own events; the
    chunks are then stacked on the largest of those canvases, each anchored at the top
    left and padded with white, and `chunk_canvas_sizes` gives each one's own size.
    """
    if (height is None) != (width is None):
        raise ValueError("give both height and width, or neither")
    bounds = chunk_bounds(len(events), n_images)
    if height is None:
        sizes = chunk_canvas_sizes(events, n_images)
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    images = np.full((n_images, height, width, 3), WHITE, dtype=np.uint8)
    bad = _paint_chunks(events.x, events.y, events.p, bounds, images)
    if bad >= 0:
        raise ValueError(f"event {bad} at (x={events.x[bad]}, y={events.y[bad]}) lies outside the {width}x{height} canvas")
    return images


@numba.njit(cache=True, nogil=True)
def _paint_chunks(x, y, p, bounds, images) -> int:
    """Paint events in time order (so the last one wins); return the first off-canvas index or -1."""
    height, width = images.shape[1], images.shape[2]
    for chunk in range(bounds.shape[0] - 1):
        image = images[chunk]
        for i in range(bounds[chunk], bounds[chunk + 1]):
            col, row = x[i], y[i]
            if col >= width or row >= height:
                return i
            if p[i]:
                image[row, col, 0] = 255
                image[row, col, 1] = 0
                image[row, col, 2] = 0
            else:
                image[row, col, 0] = 0
                image[row, col, 1] = 0
                image[row, col, 2] = 255
    return -1


def polarity_histogram(events: Events, height: int, width: int) -> np.ndarray:
    """Event counts per pixel and polarity: int32 [2, H, W], channel 0 = p=0, channel 1 = p=1."""
    counts = np.zeros((2, height, width), dtype=np.int32)
    bad = _count(events.x, events.y, events.p, counts)
    if bad >= 0:
        raise ValueError(f"event {bad} at (x={events.x[bad]}, y={events.y[bad]}) lies outside the {width}x{height} sensor")
    return counts


@numba.njit(cache=True, nogil=True)
def _count(x, y, p, counts) -> int:
    height, width = counts.shape[1], counts.shape[2]
    for i in range(x.shape[0]):
        if x[i] >= width or y[i] >= height:
            return i
        counts[p[i], y[i], x[i]] += 1
    return -1


def voxel_grid(events: Events, n_bins: int, height: int, width: int) -> np.ndarray:
    """Voxel grid float32 [n_bins, H, W], bilinear in time only (Zhu et al. 2019 / E-RAFT variant).

    Each event adds its polarity as +1 (p=1) or -1 (p=0) to the two time bins around
    its normalised time tn = (t - t_first) / (t_last - t_first) * (n_bins - 1), with
    weights 1 - frac(tn) and frac(tn); no spatial interpolation. A window whose events
    all share one time puts them in bin 0.
    """
    grid = np.zeros((n_bins, height, width), dtype=np.float32)
    if len(events) == 0:
        return grid
    span_us = float(events.t[-1] - events.t[0])
    scale = (n_bins - 1) / span_us if span_us > 0 else 0.0
    bad = _accumulate_voxels(events.x, events.y, events.t, events.p, int(events.t[0]), scale, grid)
    if bad >= 0:
        raise ValueError(f"event {bad} at (x={events.x[bad]}, y={events.y[bad]}) lies outside the {width}x{height} sensor")
    return grid


@numba.njit(cache=True, nogil=True)
def _accumulate_voxels(x, y, t, p, t_first, scale, grid) -> int:
    n_bins, height, width = grid.shape
    for i in range(x.shape[0]):
        col, row = x[i], y[i]
        if col >= width or row >= height:
            return i
        value = 1.0 if p[i] else -1.0
        position = (t[i] - t_first) * scale
        lower = int(position)
        frac = position - lower
        grid[lower, row, col] += value * (1.0 - frac)
        if lower + 1 < n_bins:
            grid[lower + 1, row, col] += value * frac
    return -1
