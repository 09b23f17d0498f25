"""Representations are bit-exact with the per-event rules they claim to implement."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_events
from hypothesis import given, settings
from hypothesis import strategies as st

from evspec.events import (
    Events,
    chunk_bounds,
    chunk_canvas_sizes,
    eventgpt_images,
    polarity_histogram,
    read_eventgpt_npy,
    voxel_grid,
)


def naive_eventgpt_images(events: Events, n_images: int, height: int, width: int) -> np.ndarray:
    """The authors' rule, one event at a time: equal-count chunks, last event wins."""
    n = len(events)
    size = n // n_images
    images = np.full((n_images, height, width, 3), 255, np.uint8)
    for chunk in range(n_images):
        stop = n if chunk == n_images - 1 else (chunk + 1) * size
        for i in range(chunk * size, stop):
            images[chunk, events.y[i], events.x[i]] = (255, 0, 0) if events.p[i] == 1 else (0, 0, 255)
    return images


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(5, 400), n_images=st.integers(1, 6),
       height=st.integers(1, 6), width=st.integers(1, 6))  # fmt: skip
def test_eventgpt_images_equal_per_event_loop(seed, n, n_images, height, width):
    events = random_events(np.random.default_rng(seed), max(n, n_images), height, width)
    expected = naive_eventgpt_images(events, n_images, height, width)
    np.testing.assert_array_equal(eventgpt_images(events, n_images, height, width), expected)


def test_last_event_in_time_wins_at_a_pixel():
    events = Events.from_arrays([0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 2, 3, 4, 5], [1, 0, 1, 1, 0])
    image = eventgpt_images(events, 1, 1, 1)[0, 0, 0]
    np.testing.assert_array_equal(image, [0, 0, 255])


def test_chunks_are_equal_count_and_last_takes_remainder():
    np.testing.assert_array_equal(chunk_bounds(12, 5), [0, 2, 4, 6, 8, 12])
    with pytest.raises(ValueError, match="cannot fill"):
        chunk_bounds(3, 5)


def test_authors_canvas_uses_each_chunks_extent():
    events = Events.from_arrays([1, 9, 2, 3], [0, 4, 7, 1], [0, 1, 2, 3], [1, 1, 0, 0])
    assert chunk_canvas_sizes(events, 2) == [(5, 10), (8, 4)]
    images = eventgpt_images(events, 2)
    assert images.shape == (2, 8, 10, 3)
    np.testing.assert_array_equal(images[1, 7, 2], [0, 0, 255])
    assert (images[1, :, 4:] == 255).all()  # padding beyond chunk 2's own 4-pixel width is white


def test_off_canvas_events_raise_instead_of_writing_out_of_bounds():
    events = Events.from_arrays([0, 5], [0, 0], [0, 1], [1, 1])
    with pytest.raises(ValueError, match="event 1"):
        eventgpt_images(events, 1, 4, 4)
    with pytest.raises(ValueError, match="event 1"):
        polarity_histogram(events, 4, 4)


def test_real_sample_images(eventgpt_sample):
    events = read_eventgpt_npy(eventgpt_sample)
    images = eventgpt_images(events, 5, 480, 640)
    np.testing.assert_array_equal(images, naive_eventgpt_images(events, 5, 480, 640))
    painted = (images != 255).any(axis=-1).sum(axis=(1, 2))
    assert (painted > 10_000).all()


def test_polarity_histogram_counts_every_event():
    events = random_events(np.random.default_rng(1), 5000, 7, 9)
    counts = polarity_histogram(events, 7, 9)
    expected = np.zeros((2, 7, 9), np.int32)
    np.add.at(expected, (events.p, events.y, events.x), 1)
    np.testing.assert_array_equal(counts, expected)


def test_voxel_grid_is_bilinear_in_time():
    events = random_events(np.random.default_rng(2), 3000, 5, 6)
    n_bins = 4
    grid = voxel_grid(events, n_bins, 5, 6)
    expected = np.zeros((n_bins, 5, 6), np.float64)
    tn = (events.t - events.t[0]) / (events.t[-1] - events.t[0]) * (n_bins - 1)
    for i in range(len(events)):
        value = 1.0 if events.p[i] else -1.0
        lower = int(np.floor(tn[i]))
        expected[lower, events.y[i], events.x[i]] += value * (1 - (tn[i] - lower))
        if lower + 1 < n_bins:
            expected[lower + 1, events.y[i], events.x[i]] += value * (tn[i] - lower)
    np.testing.assert_allclose(grid, expected, atol=1e-4)
    # Total signed mass is preserved: the two weights of every event sum to one.
    assert grid.sum() == pytest.approx(float((2 * events.p.astype(int) - 1).sum()), abs=1e-2)


def test_representations_do_not_modify_input():
    events = random_events(np.random.default_rng(3), 100, 4, 4)
    before = [a.copy() for a in (events.x, events.y, events.t, events.p)]
    eventgpt_images(events, 5, 4, 4)
    polarity_histogram(events, 4, 4)
    voxel_grid(events, 3, 4, 4)
    for a, b in zip(before, (events.x, events.y, events.t, events.p), strict=True):
        np.testing.assert_array_equal(a, b)
