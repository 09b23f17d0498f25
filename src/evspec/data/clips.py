"""Cutting recordings into clips, and choosing each model's view of a clip.

A clip is a span of the frame clock. The target (Video-LLaVA) sees `n_frames` frames
sampled uniformly over the whole clip; the draft (EventGPT) sees only the last
`event_window_ms` of events, because EventGPT was trained on ~50 ms windows and its
own loader refuses 100 ms or more.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EVENTGPT_MAX_WINDOW_MS = 100  # EventGPT's loader refuses windows this long or longer


@dataclass(frozen=True)
class WindowSettings:
    clip_duration_ms: int = 500
    clip_overlap_ms: int = 250
    event_window_ms: int = 50
    n_event_images: int = 5
    n_frames: int = 8
    min_events: int = 100  # a draft window with fewer events is skipped (and recorded as skipped)
    frame_height: int | None = None  # None: keep the recording's frame size
    frame_width: int | None = None
    # other lengths of the draft's window, ending where it ends (the event-window sweep); each within EventGPT's
    # regime, never a whole clip: tensors.h5 gets event_images_{ms}ms, the manifest n_events_{ms}ms
    event_window_sweep_ms: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name, window in (("event_window_ms", self.event_window_ms),
                             *(("event_window_sweep_ms", ms) for ms in self.event_window_sweep_ms)):  # fmt: skip
            if not 0 < window < EVENTGPT_MAX_WINDOW_MS:
                raise ValueError(f"{name} must be in (0, {EVENTGPT_MAX_WINDOW_MS}), got {window}")
            if window > self.clip_duration_ms:
                raise ValueError(f"{name} ({window}) cannot exceed clip_duration_ms ({self.clip_duration_ms})")
        if self.event_window_ms in self.event_window_sweep_ms or len(set(self.event_window_sweep_ms)) < len(
                self.event_window_sweep_ms):  # fmt: skip
            raise ValueError(f"event_window_sweep_ms {list(self.event_window_sweep_ms)} must hold other lengths than "
                             f"event_window_ms ({self.event_window_ms}), each once")
        if not 0 <= self.clip_overlap_ms < self.clip_duration_ms:
            raise ValueError("clip_overlap_ms must be in [0, clip_duration_ms)")
        if (self.frame_height is None) != (self.frame_width is None):
            raise ValueError("give both frame_height and frame_width, or neither")


@dataclass(frozen=True)
class Clip:
    sequence: str
    index: int  # position within the sequence
    t_start_us: int  # clip span [t_start_us, t_end_us), image clock
    t_end_us: int
    event_start_us: int  # the draft's event window [event_start_us, event_end_us)
    event_end_us: int
    frame_indices: tuple[int, ...]  # into the sequence's frames, n_frames of them, time order

    @property
    def single_frame_index(self) -> int:
        """The 1-frame variant: the clip's last frame, nearest the event window (the last pick)."""
        return self.frame_indices[-1]

    @property
    def sample_id(self) -> str:
        return f"{self.sequence}/{self.index:04d}"


def plan_clips(sequence: str, frame_times_us: np.ndarray, settings: WindowSettings) -> list[Clip]:
    """Clips of `clip_duration_ms`, stepping by duration - overlap, inside the frame time range.

    E.g. frames from 0 to 2.0 s, 500 ms clips, 250 ms overlap -> starts 0, 0.25, ..., 1.5 s: 7 clips.
    """
    duration_us = settings.clip_duration_ms * 1000
    stride_us = (settings.clip_duration_ms - settings.clip_overlap_ms) * 1000
    first_us, last_us = int(frame_times_us[0]), int(frame_times_us[-1])
    clips = []
    for index, start_us in enumerate(range(first_us, last_us - duration_us + 1, stride_us)):
        end_us = start_us + duration_us
        inside = np.flatnonzero((frame_times_us >= start_us) & (frame_times_us < end_us))
        if inside.size == 0:
            continue
        picks = inside[np.round(np.linspace(0, inside.size - 1, settings.n_frames)).astype(int)]
        clips.append(
            Clip(
                sequence=sequence,
                index=index,
                t_start_us=start_us,
                t_end_us=end_us,
                event_start_us=end_us - settings.event_window_ms * 1000,
                event_end_us=end_us,
                frame_indices=tuple(int(i) for i in picks),
            )
        )
    return clips


def assign_splits(sequences: list[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Map each sequence to a split, so that no sequence's clips land in two splits.

    A seeded permutation of the sorted names is cut by the fractions (rounded, each
    split non-empty when there are enough sequences); the result does not depend on
    the order the sequences were listed in.
    """
    names = sorted(sequences)
    order = np.random.default_rng(seed).permutation(len(names))
    split_names = list(fractions)
    total = sum(fractions.values())
    counts = [int(round(len(names) * fractions[name] / total)) for name in split_names]
    for i, name in enumerate(split_names):  # give every split at least one sequence if possible
        if counts[i] == 0 and len(names) >= len(split_names):
            counts[int(np.argmax(counts))] -= 1
            counts[i] = 1
    counts[0] += len(names) - sum(counts)
    assignment, position = {}, 0
    for name, count in zip(split_names, counts, strict=True):
        for i in order[position : position + count]:
            assignment[names[i]] = name
        position += count
    return assignment
