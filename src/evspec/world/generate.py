"""`python -m evspec synth`: write a seeded synthetic event+video world in the DSEC layout.

Each sequence is one scene recorded for `duration_s`:

    {out}/world.json                              settings and sequence names
    {out}/{sequence}/events/left/events.h5         /events/{x,y,t,p}, /ms_to_idx, /t_offset (Blosc-ZSTD)
    {out}/{sequence}/images/left/rectified/*.png    RGB frames at frame_rate_hz
    {out}/{sequence}/images/timestamps.txt          frame times, microseconds, image clock
    {out}/{sequence}/annotations.json               the scene: objects, motion, camera (ground truth)

The same settings and seed give byte-identical event files and frames.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from evspec.atomic import atomic_output
from evspec.events.types import Events
from evspec.h5 import blosc_zstd
from evspec.progress import progress
from evspec.settings import to_json
from evspec.world.esim import EventSimulator, SensorParams
from evspec.world.render import SceneRenderer
from evspec.world.scene import sample_scene

log = logging.getLogger(__name__)

T_OFFSET_US = 1_000_000  # image clock of the first frame; exercises the reader's t_offset


@dataclass(frozen=True)
class WorldSettings(SensorParams):
    """The world's settings; the event-sensor ones (pos_thres, ...) come from `SensorParams`."""

    seed: int = 0
    n_sequences: int = 48
    duration_s: float = 2.0
    height: int = 96
    width: int = 128
    frame_rate_hz: float = 20.0
    internal_rate_hz: float = 500.0
    max_objects: int = 3
    radius_px: tuple[float, ...] = (6.0, 14.0)
    speed_px_s: tuple[float, ...] = (10.0, 28.0)
    camera_motion_fraction: float = 0.3
    camera_speed_px_s: float = 6.0

    def sequence_names(self) -> list[str]:
        return [f"seq-{index:03d}" for index in range(self.n_sequences)]


def generate_world(out_dir: str | Path, settings: WorldSettings, workers: int = 1) -> None:
    """Write every sequence into a temporary directory, then rename it to `out_dir`.

    Sequences are independent (each has its own seeded stream), so `workers`
    processes produce byte-identical output to one.
    """
    with atomic_output(out_dir) as staging:
        staging.mkdir()
        names = settings.sequence_names()
        jobs = [(staging / name, settings, index) for index, name in enumerate(names)]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            counts = pool.map(_write_sequence_job, jobs)
            for name, n_events in zip(names, progress(counts, total=len(names), desc="synth", unit="seq"), strict=True):
                log.debug("%s: %d events", name, n_events)
        (staging / "world.json").write_text(
            json.dumps({"settings": json.loads(to_json(settings)), "sequences": names}, indent=2)
        )


def _write_sequence_job(job: tuple[Path, WorldSettings, int]) -> int:
    sequence_dir, settings, index = job
    # One independent stream per sequence: changing n_sequences keeps the earlier ones.
    return write_sequence(sequence_dir, settings, np.random.default_rng([settings.seed, index]))


def write_sequence(sequence_dir: Path, settings: WorldSettings, rng: np.random.Generator) -> int:
    """Render, simulate and write one sequence; returns its event count."""
    scene = sample_scene(rng, settings)
    renderer = SceneRenderer(scene, settings.height, settings.width, settings.duration_s)
    duration_us = int(round(settings.duration_s * 1e6))

    # 1. Events from luminance frames at the internal rate.
    internal_times_us = np.linspace(0, duration_us, int(round(settings.duration_s * settings.internal_rate_hz)) + 1)
    internal_times_us = np.round(internal_times_us).astype(np.int64)
    simulator = EventSimulator(renderer.luminance(0.0), settings, rng)
    for t_previous, t_current in zip(internal_times_us[:-1], internal_times_us[1:], strict=True):
        simulator.step(renderer.luminance(t_current * 1e-6), int(t_previous), int(t_current))
    events = simulator.events()

    # 2. RGB frames at the frame rate, on the same clock.
    frame_period_us = 1e6 / settings.frame_rate_hz
    frame_times_us = np.round(np.arange(0, duration_us + 1, frame_period_us)).astype(np.int64)
    frames_dir = sequence_dir / "images" / "left" / "rectified"
    frames_dir.mkdir(parents=True)
    for index, t_us in enumerate(frame_times_us):
        Image.fromarray(renderer.rgb(t_us * 1e-6)).save(frames_dir / f"{index:06d}.png")
    np.savetxt(sequence_dir / "images" / "timestamps.txt", frame_times_us + T_OFFSET_US, fmt="%d")

    write_dsec_events(sequence_dir / "events" / "left" / "events.h5", events, settings.height, settings.width, duration_us)
    (sequence_dir / "annotations.json").write_text(json.dumps(scene.to_dict(), indent=2))
    return len(events)


def write_dsec_events(path: Path, events: Events, height: int, width: int, duration_us: int) -> None:
    """Write `events` (relative times) as a DSEC `events.h5` with t_offset = T_OFFSET_US."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n_ms = duration_us // 1000 + 1
    ms_to_idx = np.searchsorted(events.t, np.arange(n_ms, dtype=np.int64) * 1000, side="left")
    with atomic_output(path) as temporary, h5py.File(temporary, "w") as handle:
        group = handle.create_group("events")
        group.attrs["height"], group.attrs["width"] = height, width
        for name, values in (("x", events.x), ("y", events.y), ("t", events.t.astype(np.uint32)), ("p", events.p)):
            group.create_dataset(name, data=values, chunks=(min(len(values), 1 << 15) or 1,), **blosc_zstd())
        handle.create_dataset("ms_to_idx", data=ms_to_idx.astype(np.uint64))
        handle.create_dataset("t_offset", data=np.int64(T_OFFSET_US))
