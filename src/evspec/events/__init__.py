"""Event streams: the `Events` type, file readers and model-input representations."""

from evspec.events.readers import read_dsec_window, read_eventgpt_npy, read_nimagenet_npz
from evspec.events.representations import (
    chunk_bounds,
    chunk_canvas_sizes,
    eventgpt_images,
    polarity_histogram,
    voxel_grid,
)
from evspec.events.types import Events, check_events

__all__ = [
    "Events",
    "check_events",
    "chunk_bounds",
    "chunk_canvas_sizes",
    "eventgpt_images",
    "polarity_histogram",
    "read_dsec_window",
    "read_eventgpt_npy",
    "read_nimagenet_npz",
    "voxel_grid",
]
