"""Shared fixtures: a tiny synthetic world (built once per session) and the real EventGPT sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evspec.world.generate import WorldSettings, generate_world

PROJECT = Path(__file__).resolve().parents[1]
EVENTGPT_SAMPLE = PROJECT.parent / "shared" / "data" / "eventgpt_sample1.npy"

TINY_WORLD = WorldSettings(seed=7, n_sequences=4, duration_s=1.0, height=48, width=64,
                           radius_px=(4.0, 8.0), speed_px_s=(8.0, 20.0), internal_rate_hz=400.0)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A 4-sequence, 1-second, 64x48 world in the DSEC layout (read-only by convention)."""
    out = tmp_path_factory.mktemp("world") / "world"
    generate_world(out, TINY_WORLD)
    return out


@pytest.fixture(scope="session")
def eventgpt_sample() -> Path:
    if not EVENTGPT_SAMPLE.is_file():
        pytest.skip(f"real EventGPT sample not found at {EVENTGPT_SAMPLE} (shared data absent)")
    return EVENTGPT_SAMPLE


def random_events(rng: np.random.Generator, n: int, height: int, width: int, t_span_us: int = 50_000):
    """Sorted random events on a small sensor, so many land on the same pixel."""
    from evspec.events import Events

    t = np.sort(rng.integers(0, t_span_us, n))
    return Events.from_arrays(rng.integers(0, width, n), rng.integers(0, height, n), t, rng.integers(0, 2, n))
