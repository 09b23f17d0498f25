"""`python -m evspec speculate`: every method on every clip of one shard, one parquet per method.

Per clip, after the pixels are preprocessed and on the device (disk reads and host
preprocessing are not timed), each method answers the clip's question from scratch:

    target        target vision -> prefill -> one fast step per token (the baseline)
    hf-generate   transformers' `generate` on the same target model
    hf-assisted   transformers' assisted generation with the draft as `assistant_model`
    token         as target, then EventGPT (events -> its prompt -> prefill) drafts k per cycle
    feature       as target, then the draft head (reading EventGPT's event tokens) drafts k
    prefill       EventGPT drafts k tokens while the target encodes video and prefills (a
                  second CUDA stream; sequential on CPU, said in the `overlapped` column);
                  the drafts are verified right after the prefill, then `token` continues

With `draft_device` set (e.g. "cuda:1") the draft runs on a second GPU and `prefill` overlaps
across the two GPUs instead of two streams; draft tokens cross to the target's GPU per cycle.

`ttft_ms` is the time to the first answer token, `total_ms` to the whole answer; both
include vision and prefill. A method that cannot run on this pair is recorded with the
reason in `status` instead of numbers.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from evspec.adapter.modules import DraftHead, HeadConfig
from evspec.atomic import atomic_output
from evspec.errors import InputError
from evspec.models.checkpoint import DTYPES
from evspec.h5 import open_h5, require_dataset
from evspec.models.processing import check_images, clip_preprocess
from evspec.models.splice import embed_with_visual_tokens
from evspec.models.stages import EventGPTStages, LanguageStages, VideoLlavaStages
from evspec.models.toy import ModelPair
from evspec.spec.decode import Decoded, Sampler, decode_speculative, decode_target
from evspec.spec.drafters import HeadDrafter, PrefetchedDrafter, TokenDrafter
from evspec.spec.fast_llama import FastLlama

log = logging.getLogger(__name__)

METHODS = ("target", "hf-generate", "hf-assisted", "token", "feature", "prefill")
DRAFTING = ("hf-assisted", "token", "feature", "prefill")


@dataclass(frozen=True)
class SpecSettings:
    methods: tuple[str, ...] = METHODS
    draft_lengths: dict[str, list[int]] = field(
        default_factory=lambda: {"hf-assisted": [4], "token": [2, 4], "feature": [2, 4], "prefill": [4]}
    )
    temperature: float = 0.0
    max_new_tokens: int = 32
    split: str = "test"
    max_clips: int = 0  # 0: every clip of the split
    seed: int = 0
    device: str = "cpu"
    draft_device: str | None = None  # e.g. "cuda:1": the draft on a second GPU (prefill overlaps across GPUs)
    dtype: str = "float32"
    threads: int = 2

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
        if "target" not in self.methods:
            raise ValueError("methods must include 'target': every speedup and lossless check is against it")
        for method in set(self.methods) & set(DRAFTING):
            if not self.draft_lengths.get(method):
                raise ValueError(f"draft_lengths needs a list of k for {method!r}")


@dataclass
class Clip:
    sample_id: str
    question: str
    frames: torch.Tensor  # [8, 3, S, S] on the device
    events: torch.Tensor  # [T, 3, S', S'] on the device


class Stopwatch:
    """Milliseconds since construction, read after synchronising the devices (outside decode loops)."""

    def __init__(self, *devices: torch.device) -> None:
        self.devices = {d for d in devices if d.type == "cuda"}
        self._sync()
        self.started = time.perf_counter()

    def _sync(self) -> None:
        for device in self.devices:
            torch.cuda.synchronize(device)

    def ms(self) -> float:
        self._sync()
        return (time.perf_counter() - self.started) * 1000


class Runner:
    """Both models, their fast engines and the draft head; runs any method on one clip."""

    def __init__(self, pair: ModelPair, head: DraftHead | None, settings: SpecSettings, max_prompt: int) -> None:
        self.pair, self.head, self.settings = pair, head, settings
        self.device = torch.device(settings.device)
        self.target = VideoLlavaStages(pair.target)
        self.draft = EventGPTStages(pair.draft)
        longest_draft = max((max(v) for v in settings.draft_lengths.values()), default=0)
        room = max_prompt + settings.max_new_tokens + longest_draft + 2
        self.target_engine = FastLlama(self.target.language_model, self.target.lm_head, room)
        self.draft_engine = FastLlama(self.draft.language_model, self.draft.lm_head, room)
        self.common_vocab = len(pair.draft_tokenizer)  # ids both models have: the draft's vocabulary
        self.target_vocab = self.target.lm_head.out_features
        self.eos = pair.target_tokenizer.eos_token_id
        self.generator = torch.Generator(self.device).manual_seed(settings.seed)
        self.draft_device = torch.device(settings.draft_device or settings.device)
        self.overlapped = self.device.type == "cuda"

    def sampler(self) -> Sampler:
        return Sampler(self.settings.temperature, self.generator)

    def run(self, method: str, clip: Clip, k: int) -> tuple[Decoded, float, float]:
        """(decoded answer, ttft_ms, total_ms) of `method` answering `clip` from scratch."""
        clock = Stopwatch(self.device, self.draft_device)
        if method in ("hf-generate", "hf-assisted"):
            decoded = self._hf(clip, k if method == "hf-assisted" else 0)
            return decoded, float("nan"), clock.ms()
        if method == "prefill":
            prefill, drafter = self._prefill_overlapped(clip, k)
        else:
            prefill = self._target_prefill(clip)
        first_token_ms = clock.ms()
        if method == "target":
            decoded = decode_target(self.target_engine, prefill.logits, self.settings.max_new_tokens, self.eos,
                                    self.sampler())  # fmt: skip
            decoded.target_forwards += 1  # the prefill gave the first token
            return decoded, first_token_ms, clock.ms()
        if method == "token":
            self._prefill(self.draft, self.draft_engine, self.pair.draft_tokenizer, clip.question, clip.events)
            drafter = TokenDrafter(self.draft_engine, self.common_vocab, self.target_vocab)
        elif method == "feature":
            drafter = self._head_drafter(clip)
        decoded = decode_speculative(self.target_engine, prefill, drafter, k, self.settings.max_new_tokens, self.eos,
                                     self.sampler())  # fmt: skip
        decoded.target_forwards += 1
        return decoded, first_token_ms, clock.ms()

    def cost_ratio(self, method: str, clip: Clip, repeats: int = 10) -> float:
        """c: one draft token's time over one target decode step's, both on their fast paths."""
        prefill = self._target_prefill(clip)
        token = prefill.logits[:, -1].argmax(-1).view(1, 1)
        if method == "feature":
            drafter = self._head_drafter(clip)
            drafter.start(int(token), prefill.hidden[0, -1])
            draft_step = lambda: drafter.propose(1, Sampler())  # noqa: E731 (stateless: recomputes from commits)
        else:
            draft_prefill = self._prefill(self.draft, self.draft_engine, self.pair.draft_tokenizer, clip.question,
                                          clip.events)  # fmt: skip
            draft_token = draft_prefill.logits[:, -1].argmax(-1).view(1, 1)
            draft_length = self.draft_engine.length
            draft_step = lambda: (self.draft_engine.step(draft_token), self.draft_engine.rewind(draft_length))  # noqa: E731
        target_length = self.target_engine.length
        target_step = lambda: (self.target_engine.step(token), self.target_engine.rewind(target_length))  # noqa: E731
        devices = (self.device, self.draft_device)
        return _median_ms(draft_step, devices, repeats) / _median_ms(target_step, devices, repeats)

    def _target_prefill(self, clip: Clip):
        return self._prefill(self.target, self.target_engine, self.pair.target_tokenizer, clip.question, clip.frames)

    def _head_drafter(self, clip: Clip) -> HeadDrafter:
        """The draft head, reading this clip's event tokens (EventGPT's tower and projector, no LLM)."""
        events = self.draft.project(self.draft.encode_vision(clip.events))
        return HeadDrafter(self.head, events, self.target.language_model.embed_tokens, self.target.lm_head,
                           self.common_vocab)  # fmt: skip

    def _prefill(self, stages: LanguageStages, engine: FastLlama, tokenizer, question: str, pixels: torch.Tensor,
                 visual: torch.Tensor | None = None):  # fmt: skip
        """Vision -> projector -> spliced prompt -> fast prefill into a fresh cache."""
        if visual is None:
            visual = stages.project(stages.encode_vision(pixels))
        ids = stages.prompt_ids(tokenizer, question)
        engine.reset()
        embeds = embed_with_visual_tokens(stages.language_model.embed_tokens, ids, stages.placeholder_id, visual)
        return engine.forward_embeds(embeds)

    def _prefill_overlapped(self, clip: Clip, k: int):
        """The draft drafts k ahead on a side stream while the target encodes video and prefills."""
        if self.settings.temperature != 0:
            raise ValueError("the prefill method drafts ahead greedily: run it at temperature 0")
        target_visual = self.target.project(self.target.encode_vision(clip.frames))  # queued on the main stream
        # on one GPU the draft runs on a side stream; on its own GPU its queue is already separate
        side = torch.cuda.Stream(self.device) if self.overlapped and self.draft_device == self.device else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            draft_prefill = self._prefill(self.draft, self.draft_engine, self.pair.draft_tokenizer, clip.question,
                                          clip.events)  # fmt: skip
            prompt_length = self.draft_engine.length
            guesses = PrefetchedDrafter.draft_ahead(self.draft_engine, draft_prefill.logits, k, self.common_vocab)
        prefill = self._prefill(self.target, self.target_engine, self.pair.target_tokenizer, clip.question,
                                clip.frames, visual=target_visual)  # fmt: skip
        if side is not None:
            torch.cuda.current_stream(self.device).wait_stream(side)
        return prefill, PrefetchedDrafter(self.draft_engine, self.common_vocab, self.target_vocab, prompt_length,
                                          guesses)  # fmt: skip

    def _hf(self, clip: Clip, k: int) -> Decoded:
        """transformers' generate on the target model; with k > 0, assisted by the draft model."""
        greedy = self.settings.temperature == 0
        sampling = {} if greedy else {"temperature": self.settings.temperature, "top_k": 0, "top_p": 1.0}
        ids = self.target.prompt_ids(self.pair.target_tokenizer, clip.question)
        assist = {}
        if k:
            self.pair.draft.generation_config.num_assistant_tokens = k
            self.pair.draft.generation_config.num_assistant_tokens_schedule = "constant"
            # the vocabularies differ in size (target-only ids), so transformers runs its universal
            # assisted decoding, which re-tokenises the prompt's text for the assistant (no events)
            assist = {"assistant_model": self.pair.draft, "tokenizer": self.pair.target_tokenizer,
                      "assistant_tokenizer": self.pair.draft_tokenizer}  # fmt: skip
        out = self.pair.target.generate(input_ids=ids, pixel_values_videos=clip.frames[None],
                                        max_new_tokens=self.settings.max_new_tokens, do_sample=not greedy,
                                        eos_token_id=self.eos, pad_token_id=self.eos, **sampling, **assist)  # fmt: skip
        new = out[0, ids.shape[1] :].tolist()
        return Decoded(new, target_forwards=len(new) if not k else None)  # assisted: transformers does not say


def _median_ms(function, devices: tuple[torch.device, ...], repeats: int) -> float:
    function()  # warm-up (captures a graph on first use)
    times = []
    for _ in range(repeats):
        clock = Stopwatch(*devices)
        function()
        times.append(clock.ms())
    return float(np.median(times))


def speculate(pair: ModelPair, head: DraftHead | None, data_dir: Path, settings: SpecSettings, shard: int,
              n_shards: int, out_dir: Path) -> dict[str, pd.DataFrame]:  # fmt: skip
    """Run every method on this shard's clips; write out_dir/{method}/shard-{shard}.parquet."""
    torch.set_num_threads(settings.threads)
    if "feature" in settings.methods and head is None:
        raise InputError("--adapter-dir", "the feature method needs the trained draft head (head.safetensors)")
    clips = _shard_clips(data_dir, settings, shard, n_shards)
    runner = None
    rows: dict[str, list[dict]] = {method: [] for method in settings.methods}
    with open_h5(data_dir / "tensors.h5") as handle:
        frames, events = require_dataset(handle, "frames"), require_dataset(handle, "event_images")
        loaded = [_load_clip(row, frames, events, pair, settings, data_dir) for row in clips.itertuples()]
    if not loaded:
        log.warning("shard %d of %d holds no clips", shard, n_shards)
    for index, clip in enumerate(tqdm([loaded[0]] + loaded if loaded else [], desc="speculate", unit="clip")):
        if runner is None:
            max_prompt = max(len(VideoLlavaStages(pair.target).prompt_ids(pair.target_tokenizer, c.question)[0])
                             for c in loaded)  # fmt: skip
            runner = Runner(pair, head, settings, max_prompt)
        reference = None
        for method in sorted(settings.methods, key=lambda m: m != "target"):  # the reference first
            for k in settings.draft_lengths.get(method, [0]) if method in DRAFTING else [0]:
                row = _run_one(runner, method, clip, k, settings)
                if method == "target":
                    reference = row["output_ids"]
                row["exact_match"] = None if reference is None or row["status"] != "ok" else row["output_ids"] == reference
                if index > 0:  # the first pass over clip 0 is the warm-up (graph capture, caches)
                    rows[method].append(row)
    for method in set(settings.methods) & {"token", "feature", "prefill"}:
        ratio = runner.cost_ratio(method, loaded[-1]) if loaded else float("nan")
        for row in rows[method]:
            row["cost_ratio"] = ratio
    frames_out = {}
    for method, method_rows in rows.items():
        frame = pd.DataFrame(method_rows, columns=COLUMNS)
        path = out_dir / method / f"shard-{shard}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as temporary:
            frame.to_parquet(temporary, index=False)
        frames_out[method] = frame
    return frames_out


COLUMNS = ["sample_id", "method", "k", "temperature", "output_ids", "new_tokens", "target_forwards", "drafted",
           "accepted", "accepted_per_position", "drafted_per_position", "ttft_ms", "total_ms", "device",
           "overlapped", "status", "exact_match", "cost_ratio"]  # fmt: skip


def _run_one(runner: Runner, method: str, clip: Clip, k: int, settings: SpecSettings) -> dict:
    row = {"sample_id": clip.sample_id, "method": method, "k": k, "temperature": settings.temperature,
           "device": _device_name(runner.device), "overlapped": method == "prefill" and runner.overlapped}  # fmt: skip
    try:
        decoded, ttft, total = runner.run(method, clip, k)
    except Exception as error:  # a method this pair cannot run is a result, recorded with its reason
        if method != "hf-assisted":
            raise
        log.warning("%s cannot run on this pair: %s", method, error)
        return {**row, "status": f"not run: {type(error).__name__}: {str(error)[:300]}"}
    return {**row, "status": "ok", "output_ids": decoded.output_ids, "new_tokens": len(decoded.output_ids),
            "target_forwards": decoded.target_forwards, "drafted": decoded.drafted, "accepted": decoded.accepted,
            "accepted_per_position": decoded.accepted_per_position,
            "drafted_per_position": decoded.drafted_per_position, "ttft_ms": ttft, "total_ms": total}  # fmt: skip


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _shard_clips(data_dir: Path, settings: SpecSettings, shard: int, n_shards: int) -> pd.DataFrame:
    if not 0 <= shard < n_shards:
        raise InputError("--shard", f"shard {shard} is outside 0..{n_shards - 1}")
    manifest = pd.read_parquet(data_dir / "manifest.parquet")
    clips = manifest[manifest["split"] == settings.split].sort_values("sample_id")
    if settings.max_clips:
        clips = clips.head(settings.max_clips)
    return clips.iloc[shard::n_shards]


def _load_clip(row, frames, events, pair: ModelPair, settings: SpecSettings, source: Path) -> Clip:
    """Read and preprocess one clip on the host, then move it to the device (neither is timed)."""
    device, dtype = torch.device(settings.device), DTYPES[settings.dtype]
    draft_device = torch.device(settings.draft_device or settings.device)
    clip_frames, clip_events = frames[row.tensor_index], events[row.tensor_index]
    target_size = pair.target.config.vision_config.image_size
    draft_size = pair.draft.config.vision_config.image_size
    check_images(clip_frames, 8, f"frames of {row.sample_id}", source)
    check_images(clip_events, pair.draft.config.n_event_images, f"event images of {row.sample_id}", source)
    return Clip(row.sample_id, row.question, clip_preprocess(clip_frames, target_size).to(device, dtype),
                clip_preprocess(clip_events, draft_size).to(draft_device, dtype))
