"""`python -m evspec speculate`: every method on every clip of one shard, one parquet per method.

The methods and their timing are `evspec.speculative.methods`. The first pass over the
shard's first clip is a warm-up (graph capture, compilation) and is not recorded. Per shard
and (method, k) the unit costs of the cost model (`evspec.speculative.cost`) are measured on
the last clip: one draft token, one target step, one verify of k + 1 tokens.

Sampling (temperature > 0, with top-k / top-p) applies one `SamplingSpec` to both models.
One sample per method cannot show losslessness, so `exact_match` is greedy-only; with
sampling, `lossless_draws` repeated draws of the first `lossless_tokens` answer tokens on the
first `lossless_clips` clips of the split go to lossless/shard-{i}.parquet for every method,
and for `draft-alone` (EventGPT sampling its own answer), the negative control that shows
the summary's distribution test can tell two laws apart.

A method that cannot run on this pair is recorded with the reason in `status` instead of numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch

from evspec.adapter.modules import DraftHead
from evspec.atomic import atomic_output
from evspec.errors import InputError
from evspec.h5 import open_h5, require_dataset
from evspec.models.checkpoint import DTYPES
from evspec.models.processing import check_images, clip_preprocess
from evspec.models.stages import EventGPTStages, VideoLlavaStages
from evspec.models.tokenizer import SharedVocabulary
from evspec.models.toy import ModelPair
from evspec.progress import progress
from evspec.speculative.lossless import DRAFT_ALONE
from evspec.speculative.methods import Clip, Engines, SpecSettings
from evspec.speculative.names import DRAFTER_COUNTS, DRAFTING, INPUT_VARIANTS, UNIT_COSTED

log = logging.getLogger(__name__)


def speculate(pair: ModelPair, head: DraftHead | None, data_dir: Path, settings: SpecSettings, shard: int,
              n_shards: int, out_dir: Path) -> dict[str, pd.DataFrame]:  # fmt: skip
    """Run every method on this shard's clips; write out_dir/{method}/shard-{shard}.parquet
    and out_dir/lossless/shard-{shard}.parquet (the sampling draws; empty when greedy)."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)  # transformers' generate samples from the global stream
    if settings.needs_head and head is None:
        raise InputError("--adapter-dir", "the feature methods need the trained draft head (head.safetensors)")
    if not 0 <= shard < n_shards:
        raise InputError("--shard", f"shard {shard} is outside 0..{n_shards - 1}")
    split = _split_clips(data_dir, settings, pair.draft.config.n_event_images)
    clips = split.iloc[shard::n_shards]
    with open_h5(data_dir / "tensors.h5") as handle:
        frames, events = require_dataset(handle, "frames"), require_dataset(handle, settings.event_dataset)
        single = require_dataset(handle, "frame_single") if "target-1frame" in settings.methods else None
        loaded = [_load_clip(row, frames, events, pair, settings, data_dir, single) for row in clips.itertuples()]
    if not loaded:
        log.warning("shard %d of %d holds no clips", shard, n_shards)
    engines = None
    if loaded:
        vocabulary = SharedVocabulary.from_tokenizers(pair.draft_tokenizer, pair.target_tokenizer,
                                                      pair.draft.lm_head.out_features, pair.target.lm_head.out_features)  # fmt: skip
        max_prompts = (max(c.target_ids.shape[1] for c in loaded), max(c.draft_ids.shape[1] for c in loaded))
        engines = Engines(pair, head, vocabulary, pair.target_tokenizer.eos_token_id, settings, max_prompts)
    variants = [(method, k) for method in sorted(settings.methods, key=lambda m: m != "target")  # the reference first
                for k in (settings.draft_lengths.get(method, [0]) if method in DRAFTING else [0])]  # fmt: skip
    rows: dict[str, list[dict]] = {method: [] for method in settings.methods}
    for index, clip in enumerate(progress([loaded[0]] + loaded if loaded else [], desc="speculate", unit="clip")):
        reference = None
        for method, k in variants:
            row = _run_one(engines, method, clip, k, settings)
            if method == "target":
                reference = row["output_ids"]
            if settings.sampling.greedy and row["status"] == "ok":  # one sample proves nothing when sampling
                row["exact_match"] = row["output_ids"] == reference
            if index > 0:  # the first pass over clip 0 is the warm-up (graph capture, caches)
                rows[method].append(row)
    for method_rows in rows.values():  # the answer as text, for the per-clip page
        for row in method_rows:
            if row["status"] == "ok":
                row["answer_text"] = pair.target_tokenizer.decode(row["output_ids"], skip_special_tokens=True)
    for method, k in variants if engines is not None else []:
        if method in UNIT_COSTED and engines.link is None:  # over a link a cycle's cost is the link's as much
            costs = engines.unit_costs(method, loaded[-1], k)
            for row in rows[method]:
                if row["k"] == k:
                    row.update(costs)
    ran = [(method, k) for method, k in variants  # a variant this pair cannot run gets no draws either, nor does
           if method not in INPUT_VARIANTS  # the target on other inputs (its law is not the target's to keep)
           and any(row["k"] == k and row["status"] == "ok" for row in rows[method])]  # fmt: skip
    draws = _lossless_draws(engines, loaded, set(split["sample_id"].head(settings.lossless_clips)), ran, settings)
    frames_out = {}
    for method, method_rows in [*rows.items(), ("lossless", draws)]:
        frame = pd.DataFrame(method_rows, columns=LOSSLESS_COLUMNS if method == "lossless" else COLUMNS)
        path = out_dir / method / f"shard-{shard}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as temporary:
            frame.to_parquet(temporary, index=False)
        frames_out[method] = frame
    return frames_out


COLUMNS = ["sample_id", "method", "k", "temperature", "top_k", "top_p", "output_ids", "new_tokens", "target_forwards",
           "drafted", "accepted", "drafted_per_position", "reached_per_position", "accepted_per_position", "ttft_ms",
           "draft_setup_ms", "decode_ms", "total_ms", "device", "dtype", "overlapped", "status", "exact_match",
           "draft_token_ms", "target_step_ms", "verify_ms", "answer_text", "link_rtt_ms", "link_bandwidth_mbit_s",
           *DRAFTER_COUNTS]  # fmt: skip
LOSSLESS_COLUMNS = ["sample_id", "method", "k", "draw", "output_ids"]


def _run_one(engines: Engines, method: str, clip: Clip, k: int, settings: SpecSettings) -> dict:
    row = {"sample_id": clip.sample_id, "method": method, "k": k, "temperature": settings.temperature,
           "top_k": settings.top_k, "top_p": settings.top_p, "device": _device_name(engines.device), "dtype": settings.dtype,
           "overlapped": method == "prefill" and engines.overlapped, "link_rtt_ms": settings.link_rtt_ms,
           "link_bandwidth_mbit_s": settings.link_bandwidth_mbit_s if settings.link_rtt_ms is not None else None}  # fmt: skip
    try:
        timed = engines.run(method, clip, k)
    except Exception as error:  # a method this pair cannot run is a result, recorded with its reason
        if method != "hf-assisted":
            raise
        log.warning("%s cannot run on this pair: %s", method, error)
        return {**row, "status": f"not run: {type(error).__name__}: {str(error)[:300]}"}
    decoded = timed.decoded
    return {**row, "status": "ok", "output_ids": decoded.output_ids, "new_tokens": len(decoded.output_ids),
            "target_forwards": decoded.target_forwards, "drafted": decoded.drafted, "accepted": decoded.accepted,
            "drafted_per_position": decoded.drafted_per_position,
            "reached_per_position": decoded.reached_per_position,
            "accepted_per_position": decoded.accepted_per_position, "ttft_ms": timed.ttft_ms,
            "draft_setup_ms": timed.draft_setup_ms, "decode_ms": timed.decode_ms, "total_ms": timed.total_ms,
            **(decoded.drafter_counts or {})}  # fmt: skip


def _lossless_draws(engines: Engines | None, loaded: list[Clip], chosen: set[str], variants: list[tuple[str, int]],
                    settings: SpecSettings) -> list[dict]:  # fmt: skip
    """Sampling only: `lossless_draws` answers of `lossless_tokens` tokens per chosen clip and variant."""
    if settings.sampling.greedy or not settings.lossless_draws or engines is None:
        return []
    rows = []
    clips = [clip for clip in loaded if clip.sample_id in chosen]
    for clip in progress(clips, desc="lossless draws", unit="clip"):
        for method, k in [*variants, (DRAFT_ALONE, 0)]:
            for draw in range(settings.lossless_draws):
                ids = engines.run(method, clip, k, settings.lossless_tokens).decoded.output_ids
                rows.append({"sample_id": clip.sample_id, "method": method, "k": k, "draw": draw, "output_ids": ids})
    return rows


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _split_clips(data_dir: Path, settings: SpecSettings, n_event_images: int) -> pd.DataFrame:
    """The evaluated clips in a fixed order (shards deal them round-robin); in a swept event window, those whose
    window holds an event per EventGPT image."""
    manifest = pd.read_parquet(data_dir / "manifest.parquet")
    clips = manifest[manifest["split"] == settings.split].sort_values("sample_id")
    clips = clips.head(settings.max_clips) if settings.max_clips else clips
    if settings.event_window_ms is None:
        return clips
    counts = f"n_events_{settings.event_window_ms}ms"  # a swept window: EventGPT needs an event per image
    if counts not in clips:
        raise InputError(data_dir / "manifest.parquet", f"no {counts} column: the data stage did not sweep a "
                         f"{settings.event_window_ms} ms window (windows.event_window_sweep_ms)")  # fmt: skip
    too_few = clips[counts] < n_event_images
    if too_few.any():
        log.warning("%d of %d clips hold fewer than %d events in the %d ms window: not evaluated there",
                    int(too_few.sum()), len(clips), n_event_images, settings.event_window_ms)  # fmt: skip
    return clips[~too_few]


def _load_clip(row, frames, events, pair: ModelPair, settings: SpecSettings, source: Path, single=None) -> Clip:
    """Read and preprocess one clip on the host, then move it to the device (neither is timed); with `single`
    (the data stage's frame_single), its 1-frame variant too."""
    device, dtype = torch.device(settings.device), DTYPES[settings.dtype]
    draft_device = torch.device(settings.draft_device or settings.device)
    clip_frames, clip_events = frames[row.tensor_index], events[row.tensor_index]
    target_size = pair.target.config.vision_config.image_size
    draft_size = pair.draft.config.vision_config.image_size
    check_images(clip_frames, 8, f"frames of {row.sample_id}", source)
    check_images(clip_events, pair.draft.config.n_event_images, f"event images of {row.sample_id}", source)
    target_ids = VideoLlavaStages(pair.target).prompt_ids(pair.target_tokenizer, row.question)
    draft_ids = EventGPTStages(pair.draft).prompt_ids(pair.draft_tokenizer, row.question)
    clip = Clip(row.sample_id, row.question, clip_preprocess(clip_frames, target_size).to(device, dtype),
                clip_preprocess(clip_events, draft_size).to(draft_device, dtype), target_ids, draft_ids)
    if single is not None:
        check_images(single[row.tensor_index], 1, f"the 1-frame variant of {row.sample_id}", source)
        clip.frame = clip_preprocess(single[row.tensor_index], target_size).to(device, dtype)
        clip.target_ids_one_frame = VideoLlavaStages(pair.target).prompt_ids(pair.target_tokenizer, row.question, 1)
    return clip
