"""The adapter stage's data: both feature caches joined clip by clip, checked against the config.

A clip contributes its target answer a[0..L-1], the target's hidden states h_t[i] (what
predicts a[i]), the draft's teacher-forced h_d[i] along the same answer, and the draft's
projected event tokens. Caches made by other models or preprocessing are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from evspec.errors import InputError
from evspec.features.extract import FeatureSettings, expected_fingerprint
from evspec.features.store import FeatureReader
from evspec.fingerprint import settings_digest


@dataclass
class ClipFeatures:
    sample_id: str
    answer_ids: torch.Tensor  # [L] int64
    target_hidden: torch.Tensor  # [L, H]
    draft_hidden: torch.Tensor  # [L, H_draft]
    event_tokens: torch.Tensor  # [N, H_draft]


def load_clips(features_dir: Path, data_dir: Path, target_dir: Path, draft_dir: Path,
               feature_settings: FeatureSettings) -> dict[str, list[ClipFeatures]]:  # fmt: skip
    """Clips per split ({"train": [...], "test": [...], ...}) from the two checked caches."""
    tensors = data_dir / "tensors.h5"
    target_path, draft_path = features_dir / "video_llava.h5", features_dir / "eventgpt.h5"
    target = FeatureReader(target_path, expected_fingerprint("video_llava", target_dir, tensors, feature_settings))
    draft = FeatureReader(draft_path, expected_fingerprint("eventgpt", draft_dir, tensors, feature_settings,
                                                           settings_digest(target.fingerprint)))  # fmt: skip
    manifest = pd.read_parquet(data_dir / "manifest.parquet")
    ids = list(manifest["sample_id"])
    clips = []
    for sample_id, t, d in zip(ids, target.records(ids, ("answer_ids", "hidden")),
                               draft.records(ids, ("hidden", "projected"))):  # fmt: skip
        if len(t["hidden"]) != len(d["hidden"]):
            raise InputError(draft_path, f"{sample_id}: {len(d['hidden'])} draft states for {len(t['hidden'])} answer tokens")
        clips.append(ClipFeatures(sample_id, torch.from_numpy(t["answer_ids"]).long(), torch.from_numpy(t["hidden"]).float(),
                                  torch.from_numpy(d["hidden"]).float(), torch.from_numpy(d["projected"]).float()))  # fmt: skip
    by_split: dict[str, list[ClipFeatures]] = {}
    for clip, split in zip(clips, manifest["split"]):
        by_split.setdefault(split, []).append(clip)
    for split in ("train", "test"):
        if not by_split.get(split):
            raise InputError(data_dir / "manifest.parquet", f"no clips in the {split} split")
    return by_split
