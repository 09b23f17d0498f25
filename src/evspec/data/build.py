"""`python -m evspec build-tensors`: clips of recordings -> manifest.parquet, tensors.h5, skipped.parquet.

manifest.parquet, one row per clip kept:
    sample_id, sequence, clip_index, t_start_us, t_end_us, event_start_us, event_end_us,
    n_events, (n_events_{ms}ms per swept window,) question_type, question, answer, split, tensor_index, and the synthetic
    world's ground truth (gt_shape, gt_colour, gt_direction, gt_count, gt_description; null for DSEC)
tensors.h5, row `tensor_index` of each dataset belongs to that clip:
    event_images [N, T, 3, H, W] uint8   EventGPT images of the draft's window, sensor-sized canvas
    event_images_{ms}ms                  the same for each window of the event-window sweep (ending where the
                                         draft's window ends); all zero where it holds fewer than T events
    frames       [N, n_frames, 3, h, w]  uint8, sampled uniformly over the clip
    frame_single [N, 1, 3, h, w]         uint8, the clip's last frame (nearest the event window)
    sample_id    [N]                     the manifest's id, for joining
skipped.parquet: clips whose event window held fewer than `min_events` events, with the count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from evspec.atomic import atomic_output
from evspec.data.clips import Clip, WindowSettings, assign_splits, plan_clips
from evspec.data.recordings import DatasetSettings, Recording, list_sequences
from evspec.events import eventgpt_images, read_dsec_window
from evspec.h5 import lz4_checksummed, open_h5
from evspec.progress import progress
from evspec.settings import to_json
from evspec.world.scene import NUMBER_WORDS, QUESTION_TYPES, QUESTIONS, Scene, answer, scene_from_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitSettings:
    seed: int = 0
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.1, "test": 0.2})


def build_tensors(
    dataset: DatasetSettings,
    windows: WindowSettings,
    split: SplitSettings,
    manifest_path: Path,
    tensors_path: Path,
    skipped_path: Path,
) -> pd.DataFrame:
    """Cut every sequence into clips and write the three outputs (each atomically)."""
    root = Path(dataset.root)
    sequences = list_sequences(root, dataset.sequences)
    splits = assign_splits(sequences, split.fractions, split.seed)
    size_hw = (windows.frame_height, windows.frame_width) if windows.frame_height else None
    rows, skipped = [], []
    widest_us = 1000 * max((windows.event_window_ms, *windows.event_window_sweep_ms))  # one read per clip serves all
    with atomic_output(tensors_path) as temporary, h5py.File(temporary, "w") as handle:
        writer = _TensorWriter(handle)
        for sequence_number, name in enumerate(progress(sequences, desc="clips", unit="seq")):
            recording = Recording(root, name)
            scene = scene_from_dict(recording.annotations()) if dataset.kind == "synthetic" else None
            height, width = _sensor_size(recording)
            for clip in plan_clips(name, recording.frame_times_us, windows):
                read = read_dsec_window(recording.events_path, clip.event_end_us - widest_us, clip.event_end_us)
                events = read.since(clip.event_start_us)
                if len(events) < max(windows.min_events, windows.n_event_images):
                    skipped.append({"sample_id": clip.sample_id, "sequence": name, "n_events": len(events),
                                    "reason": f"fewer than {windows.min_events} events in the event window"})  # fmt: skip
                    continue
                images = eventgpt_images(events, windows.n_event_images, height, width)
                swept = {ms: read.since(clip.event_end_us - 1000 * ms) for ms in windows.event_window_sweep_ms}
                frames = np.stack([recording.frame(i, size_hw) for i in clip.frame_indices])
                # frame_single is the last of the sampled frames (Clip.single_frame_index)
                tensor_index = writer.append(clip.sample_id, {
                    "event_images": images, "frames": frames, "frame_single": frames[-1:],
                    **{f"event_images_{ms}ms": _sweep_images(window, images.shape, windows)
                       for ms, window in swept.items()}})  # fmt: skip
                middle_s = (clip.t_start_us + clip.t_end_us) / 2e6  # what "describe" places the objects at
                question_type, question, reference = _question(dataset, scene, sequence_number, clip, middle_s,
                                                               (height, width))  # fmt: skip
                rows.append(_manifest_row(clip, len(events), question_type, question, reference,
                                          splits[name], tensor_index, scene, middle_s, (height, width))
                            | {f"n_events_{ms}ms": len(window) for ms, window in swept.items()})  # fmt: skip
        if not rows:
            raise ValueError(f"{root}: every clip was skipped (fewer than {windows.min_events} events per window)")
        handle.attrs["windows"] = to_json(windows)
        handle.attrs["dataset"] = to_json(dataset)
    manifest = pd.DataFrame(rows)
    skipped_frame = pd.DataFrame(skipped, columns=["sample_id", "sequence", "n_events", "reason"])
    with atomic_output(skipped_path) as temporary:
        skipped_frame.to_parquet(temporary, index=False)
    with atomic_output(manifest_path) as temporary:
        manifest.to_parquet(temporary, index=False)
    log.info("%d clips kept, %d skipped, splits %s", len(manifest), len(skipped_frame),
             manifest["split"].value_counts().to_dict())  # fmt: skip
    return manifest


def _sweep_images(events, shape: tuple[int, ...], windows: WindowSettings) -> np.ndarray:
    """EventGPT's images of one swept window; zeros where it holds fewer events than images (speculate skips
    those clips for that window, by their n_events_{ms}ms)."""
    if len(events) < windows.n_event_images:
        return np.zeros(shape, dtype=np.uint8)
    return eventgpt_images(events, windows.n_event_images, shape[1], shape[2])


def _sensor_size(recording: Recording) -> tuple[int, int]:
    with open_h5(recording.events_path) as handle:
        attrs = handle["events"].attrs
        return int(attrs.get("height", 480)), int(attrs.get("width", 640))


def _question(dataset: DatasetSettings, scene: Scene | None, sequence_number: int, clip: Clip, t_s: float,
              size_hw: tuple[int, int]):  # fmt: skip
    """Question types rotate over clips (balanced, deterministic); DSEC cycles its question list."""
    if scene is None:
        question = dataset.questions[(sequence_number + clip.index) % len(dataset.questions)]
        return "open", question, None
    question_type = QUESTION_TYPES[(sequence_number + clip.index) % len(QUESTION_TYPES)]
    return question_type, QUESTIONS[question_type], answer(scene, question_type, t_s, *size_hw)


def _manifest_row(clip: Clip, n_events: int, question_type: str, question: str, reference: str | None,
                  split: str, tensor_index: int, scene: Scene | None, t_s: float, size_hw: tuple[int, int]) -> dict:  # fmt: skip
    largest = scene.objects[0] if scene else None
    return {
        "sample_id": clip.sample_id,
        "sequence": clip.sequence,
        "clip_index": clip.index,
        "t_start_us": clip.t_start_us,
        "t_end_us": clip.t_end_us,
        "event_start_us": clip.event_start_us,
        "event_end_us": clip.event_end_us,
        "n_events": n_events,
        "question_type": question_type,
        "question": question,
        "answer": reference,
        "split": split,
        "tensor_index": tensor_index,
        "gt_shape": largest.shape if largest else None,
        "gt_colour": largest.colour if largest else None,
        "gt_direction": largest.direction if largest else None,
        "gt_count": NUMBER_WORDS[len(scene.objects)] if scene else None,
        "gt_description": answer(scene, "describe", t_s, *size_hw) if scene else None,
    }


class _TensorWriter:
    """Appends one clip at a time to resizable, per-clip-chunked, LZ4-compressed datasets."""

    def __init__(self, handle: h5py.File) -> None:
        self.handle = handle
        self.count = 0

    def append(self, sample_id: str, images: dict[str, np.ndarray]) -> int:
        """One clip's image stacks, by dataset name, each [K, H, W, 3] (stored [K, 3, H, W])."""
        for name, stack in images.items():
            array = stack.transpose(0, 3, 1, 2)
            if name not in self.handle:
                self.handle.create_dataset(name, shape=(0, *array.shape), maxshape=(None, *array.shape),
                                           dtype=np.uint8, chunks=(1, *array.shape), **lz4_checksummed())  # fmt: skip
            dataset = self.handle[name]
            if dataset.shape[1:] != array.shape:
                raise ValueError(f"{self.handle.filename}: {name} of {sample_id} has shape {array.shape}, "
                                 f"earlier clips {dataset.shape[1:]}; set windows.frame_height/frame_width")  # fmt: skip
            dataset.resize(self.count + 1, axis=0)
            dataset[self.count] = array
        if "sample_id" not in self.handle:
            self.handle.create_dataset("sample_id", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(256,))
        self.handle["sample_id"].resize(self.count + 1, axis=0)
        self.handle["sample_id"][self.count] = sample_id
        self.count += 1
        return self.count - 1
