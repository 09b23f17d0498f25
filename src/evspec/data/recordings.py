"""A recording in the DSEC layout (real DSEC or the synthetic world), read with clear errors.

    {root}/{sequence}/events/left/events.h5
    {root}/{sequence}/images/left/rectified/{index:06d}.png
    {root}/{sequence}/images/timestamps.txt        one timestamp (us, image clock) per frame
    {root}/{sequence}/annotations.json             synthetic world only: ground truth
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from evspec.errors import InputError

FRAME_CACHE_SIZE = 64  # decoded frames kept per recording (a 1 s DSEC clip spans 20)


@dataclass(frozen=True)
class DatasetSettings:
    kind: str = "synthetic"  # "synthetic" (ground-truth QA) or "dsec" (questions, no answers)
    root: str = ""
    sequences: tuple[str, ...] = ()  # empty: every sequence folder under root
    questions: tuple[str, ...] = ("Describe the scene.",)  # dsec: asked in turn, clip by clip

    def __post_init__(self) -> None:
        if self.kind not in ("synthetic", "dsec"):
            raise ValueError(f"dataset kind must be 'synthetic' or 'dsec', got {self.kind!r}")
        if not self.questions:
            raise ValueError("dataset.questions must not be empty")


class Recording:
    """One sequence folder; frames are decoded on demand and checked for a consistent size."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.directory = root / name
        self.events_path = self.directory / "events" / "left" / "events.h5"
        self.frames_dir = self.directory / "images" / "left" / "rectified"
        if not self.directory.is_dir():
            raise InputError(self.directory, "sequence folder not found")
        if not self.events_path.is_file():
            raise InputError(self.events_path, "event file not found")
        self.frame_times_us = _read_timestamps(self.directory / "images" / "timestamps.txt")
        self.frame_paths = sorted(self.frames_dir.glob("*.png"))
        if len(self.frame_paths) != len(self.frame_times_us):
            raise InputError(
                self.frames_dir,
                f"{len(self.frame_paths)} frames but {len(self.frame_times_us)} timestamps in timestamps.txt",
            )
        self._frame_shape: tuple[int, ...] | None = None
        # Overlapping clips share frames: keep the recent ones decoded (clips advance in time).
        self.frame = functools.lru_cache(maxsize=FRAME_CACHE_SIZE)(self._decode_frame)

    def _decode_frame(self, index: int, size_hw: tuple[int, int] | None) -> np.ndarray:
        """Frame `index` as uint8 [H, W, 3], resized (bicubic) to `size_hw` if given (read-only view)."""
        path = self.frame_paths[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if size_hw is not None and image.size != (size_hw[1], size_hw[0]):
                    image = image.resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC)
                pixels = np.asarray(image)
        except OSError as error:
            raise InputError(path, f"cannot decode frame: {error}") from error
        if self._frame_shape is None:
            self._frame_shape = pixels.shape
        elif pixels.shape != self._frame_shape:
            raise InputError(path, f"frame size {pixels.shape[:2]} differs from the sequence's {self._frame_shape[:2]}")
        pixels.setflags(write=False)  # shared by every clip that reads it from the cache
        return pixels

    def annotations(self) -> dict:
        path = self.directory / "annotations.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError as error:
            raise InputError(path, "ground truth missing (dataset kind 'synthetic' needs annotations.json)") from error
        except json.JSONDecodeError as error:
            raise InputError(path, f"not valid JSON: {error}") from error


def list_sequences(root: Path, requested: tuple[str, ...]) -> list[str]:
    """The requested sequence names, or every folder under `root` holding events/left/events.h5."""
    if not root.is_dir():
        raise InputError(root, "dataset root not found")
    if requested:
        return list(requested)
    names = sorted(p.parent.parent.parent.name for p in root.glob("*/events/left/events.h5"))
    if not names:
        raise InputError(root, "no sequences found (expected {sequence}/events/left/events.h5)")
    return names


def _read_timestamps(path: Path) -> np.ndarray:
    try:
        times = np.loadtxt(path, dtype=np.int64, ndmin=1)
    except FileNotFoundError as error:
        raise InputError(path, "frame timestamps not found") from error
    except ValueError as error:
        raise InputError(path, f"not a list of integer microseconds: {error}") from error
    if times.size < 2:
        raise InputError(path, f"needs at least 2 frame timestamps, found {times.size}")
    if np.any(np.diff(times) <= 0):
        raise InputError(path, "frame timestamps must increase strictly")
    return times
