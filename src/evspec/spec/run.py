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

Times per clip: `ttft_ms` to the first answer token (the target's vision and prefill),
`draft_setup_ms` for the drafter's own set-up after it (token: EventGPT's vision and
prefill; feature: EventGPT's tower and projector for the head's event tokens; prefill: 0,
it overlapped), `decode_ms` for the rest, `total_ms` for the whole answer. Per shard and
(method, k) the unit costs of the cost model (`evspec.spec.cost`) are measured on the last
clip: one draft token, one target step, one verify of k + 1 tokens.

Sampling (temperature > 0, with top-k / top-p) applies one `SamplingSpec` to both models.
One sample per method cannot show losslessness, so `exact_match` is greedy-only; with
sampling, `lossless_draws` repeated draws of the first `lossless_tokens` answer tokens on the
first `lossless_clips` clips of the split go to lossless/shard-{i}.parquet for every method,
and for `draft-alone` (EventGPT sampling its own answer), the negative control that shows
the summary's distribution test can tell two laws apart.

A method that cannot run on this pair is recorded with the reason in `status` instead of numbers.
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
from evspec.models.tokenizer import SharedVocabulary
from evspec.models.toy import ModelPair
from evspec.spec.decode import Decoded, decode_speculative, decode_target
from evspec.spec.drafters import HeadDrafter, PrefetchedDrafter, TokenDrafter
from evspec.spec.fast_llama import FastLlama
from evspec.spec.lossless import DRAFT_ALONE
from evspec.spec.sampling import Sampler, SamplingSpec

log = logging.getLogger(__name__)

METHODS = ("target", "hf-generate", "hf-assisted", "token", "feature", "prefill")
DRAFTING = ("hf-assisted", "token", "feature", "prefill")
OWN_DRAFTERS = ("token", "feature", "prefill")  # the methods whose unit costs (c, v) are measured


@dataclass(frozen=True)
class SpecSettings:
    methods: tuple[str, ...] = METHODS
    draft_lengths: dict[str, list[int]] = field(
        default_factory=lambda: {"hf-assisted": [4], "token": [2, 4], "feature": [2, 4], "prefill": [4]}
    )
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 32
    lossless_clips: int = 2  # sampling: clips of the split whose answers are drawn repeatedly
    lossless_draws: int = 200  # draws per clip and method
    lossless_tokens: int = 4  # leading answer tokens compared
    split: str = "test"
    max_clips: int = 0  # 0: every clip of the split
    seed: int = 0
    device: str = "cpu"
    draft_device: str | None = None  # e.g. "cuda:1": the draft on a second GPU (prefill overlaps across GPUs)
    dtype: str = "float32"
    draft_pixel_dtype: str | None = None  # "bfloat16": EventGPT's pixels cast as the authors' code does
    draft_vision_tower: str | None = None  # EventGPT's CLIP folder when the checkpoint lacks the tower
    threads: int = 2

    def __post_init__(self) -> None:
        SamplingSpec(self.temperature, self.top_k, self.top_p)  # validates
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
        if "target" not in self.methods:
            raise ValueError("methods must include 'target': every speedup and lossless check is against it")
        for method in set(self.methods) & set(DRAFTING):
            if not self.draft_lengths.get(method):
                raise ValueError(f"draft_lengths needs a list of k for {method!r}")

    @property
    def sampling(self) -> SamplingSpec:
        return SamplingSpec(self.temperature, self.top_k, self.top_p)


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


@dataclass
class Timed:
    """One answer and where its time went (ms; NaN where a phase is not separable, as in transformers)."""

    decoded: Decoded
    ttft_ms: float
    draft_setup_ms: float
    total_ms: float

    @property
    def decode_ms(self) -> float:
        return self.total_ms - self.ttft_ms - self.draft_setup_ms


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
        self.target_vocab = self.target.lm_head.out_features
        self.vocabulary = SharedVocabulary.from_tokenizers(pair.draft_tokenizer, pair.target_tokenizer,
                                                           self.draft.lm_head.out_features, self.target_vocab)  # fmt: skip
        self.eos = pair.target_tokenizer.eos_token_id
        self.draft_device = torch.device(settings.draft_device or settings.device)
        self.overlapped = self.device.type == "cuda"
        # one random stream per device that draws: the target's (acceptance, residual, bonus) and the draft's
        self.target_sampler = Sampler(settings.sampling, torch.Generator(self.device).manual_seed(settings.seed))
        self.draft_sampler = Sampler(settings.sampling, torch.Generator(self.draft_device).manual_seed(settings.seed + 1))

    def run(self, method: str, clip: Clip, k: int, max_new_tokens: int | None = None) -> Timed:
        """`method` answering `clip` from scratch (vision, prefill, decode), with its phases timed."""
        max_new_tokens = max_new_tokens or self.settings.max_new_tokens
        clock = Stopwatch(self.device, self.draft_device)
        if method in ("hf-generate", "hf-assisted"):
            decoded = self._hf(clip, k if method == "hf-assisted" else 0, max_new_tokens)
            return Timed(decoded, float("nan"), float("nan"), clock.ms())
        if method == DRAFT_ALONE:
            prefill = self._draft_prefill(clip)
            decoded = decode_target(self.draft_engine, prefill.logits, max_new_tokens, self.eos, self.draft_sampler)
            return Timed(decoded, float("nan"), float("nan"), clock.ms())
        if method == "prefill":
            prefill, drafter = self._prefill_overlapped(clip, k)
        else:
            prefill = self._target_prefill(clip)
        ttft_ms = clock.ms()
        if method == "target":
            decoded = decode_target(self.target_engine, prefill.logits, max_new_tokens, self.eos, self.target_sampler)
            decoded.target_forwards += 1  # the prefill gave the first token
            return Timed(decoded, ttft_ms, 0.0, clock.ms())
        if method == "token":
            self._draft_prefill(clip)
            drafter = TokenDrafter(self.draft_engine, self.vocabulary, self.target_vocab, self.draft_sampler)
        elif method == "feature":
            drafter = self._head_drafter(clip)
        setup_ms = clock.ms() - ttft_ms
        decoded = decode_speculative(self.target_engine, prefill, drafter, k, max_new_tokens, self.eos,
                                     self.target_sampler)  # fmt: skip
        decoded.target_forwards += 1
        return Timed(decoded, ttft_ms, setup_ms, clock.ms())

    def unit_costs(self, method: str, clip: Clip, k: int, repeats: int = 10) -> dict[str, float]:
        """The cost model's units (ms, medians): one draft token, one target step, one verify of k + 1 tokens."""
        prefill = self._target_prefill(clip)
        token = prefill.logits[:, -1].argmax(-1).view(1, 1)
        if method == "feature":
            drafter = self._head_drafter(clip)
            drafter.start(int(token), prefill.hidden[0, -1])
            draft_step = lambda: drafter.propose(1)  # noqa: E731 (stateless: recomputes from commits)
        else:
            draft_prefill = self._draft_prefill(clip)
            draft_token = draft_prefill.logits[:, -1].argmax(-1).view(1, 1)
            draft_length = self.draft_engine.length
            draft_step = lambda: (self.draft_engine.step(draft_token), self.draft_engine.rewind(draft_length))  # noqa: E731
        target_length = self.target_engine.length

        def target_forward(n: int) -> None:
            self.target_engine.step(token.expand(1, n))
            self.target_engine.rewind(target_length)

        devices = (self.device, self.draft_device)
        return {"draft_token_ms": _median_ms(draft_step, devices, repeats),
                "target_step_ms": _median_ms(lambda: target_forward(1), devices, repeats),
                "verify_ms": _median_ms(lambda: target_forward(k + 1), devices, repeats)}  # fmt: skip

    def _target_prefill(self, clip: Clip):
        return self._prefill(self.target, self.target_engine, self.pair.target_tokenizer, clip.question, clip.frames)

    def _draft_prefill(self, clip: Clip):
        return self._prefill(self.draft, self.draft_engine, self.pair.draft_tokenizer, clip.question, clip.events)

    def _head_drafter(self, clip: Clip) -> HeadDrafter:
        """The draft head, reading this clip's event tokens (EventGPT's tower and projector, no LLM)."""
        events = self.draft.project(self.draft.encode_vision(clip.events))
        return HeadDrafter(self.head, events, self.target.language_model.embed_tokens, self.target.lm_head,
                           self.target_sampler)  # fmt: skip

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
        target_visual = self.target.project(self.target.encode_vision(clip.frames))  # queued on the main stream
        # on one GPU the draft runs on a side stream; on its own GPU its queue is already separate
        side = torch.cuda.Stream(self.device) if self.overlapped and self.draft_device == self.device else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            draft_prefill = self._draft_prefill(clip)
            drafter = PrefetchedDrafter.draft_ahead(self.draft_engine, draft_prefill.logits, k, self.vocabulary,
                                                    self.target_vocab, self.draft_sampler)  # fmt: skip
        prefill = self._prefill(self.target, self.target_engine, self.pair.target_tokenizer, clip.question,
                                clip.frames, visual=target_visual)  # fmt: skip
        if side is not None:
            torch.cuda.current_stream(self.device).wait_stream(side)
        return prefill, drafter

    def _hf(self, clip: Clip, k: int, max_new_tokens: int) -> Decoded:
        """transformers' generate on the target model, with the run's sampling spec; with k > 0, assisted by the draft."""
        spec = self.settings.sampling
        sampling = ({"do_sample": False} if spec.greedy else
                    {"do_sample": True, "temperature": spec.temperature, "top_k": spec.top_k, "top_p": spec.top_p})  # fmt: skip
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
                                        max_new_tokens=max_new_tokens, eos_token_id=self.eos, pad_token_id=self.eos,
                                        **sampling, **assist)  # fmt: skip
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
    """Run every method on this shard's clips; write out_dir/{method}/shard-{shard}.parquet
    and out_dir/lossless/shard-{shard}.parquet (the sampling draws; empty when greedy)."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)  # transformers' generate samples from the global stream
    if "feature" in settings.methods and head is None:
        raise InputError("--adapter-dir", "the feature method needs the trained draft head (head.safetensors)")
    if not 0 <= shard < n_shards:
        raise InputError("--shard", f"shard {shard} is outside 0..{n_shards - 1}")
    split = _split_clips(data_dir, settings)
    clips = split.iloc[shard::n_shards]
    with open_h5(data_dir / "tensors.h5") as handle:
        frames, events = require_dataset(handle, "frames"), require_dataset(handle, "event_images")
        loaded = [_load_clip(row, frames, events, pair, settings, data_dir) for row in clips.itertuples()]
    if not loaded:
        log.warning("shard %d of %d holds no clips", shard, n_shards)
    runner = None
    if loaded:
        max_prompt = max(len(VideoLlavaStages(pair.target).prompt_ids(pair.target_tokenizer, c.question)[0])
                         for c in loaded)  # fmt: skip
        runner = Runner(pair, head, settings, max_prompt)
    variants = [(method, k) for method in sorted(settings.methods, key=lambda m: m != "target")  # the reference first
                for k in (settings.draft_lengths.get(method, [0]) if method in DRAFTING else [0])]  # fmt: skip
    rows: dict[str, list[dict]] = {method: [] for method in settings.methods}
    for index, clip in enumerate(tqdm([loaded[0]] + loaded if loaded else [], desc="speculate", unit="clip")):
        reference = None
        for method, k in variants:
            row = _run_one(runner, method, clip, k, settings)
            if method == "target":
                reference = row["output_ids"]
            if settings.sampling.greedy and row["status"] == "ok":  # one sample proves nothing when sampling
                row["exact_match"] = row["output_ids"] == reference
            if index > 0:  # the first pass over clip 0 is the warm-up (graph capture, caches)
                rows[method].append(row)
    for method, k in variants if runner is not None else []:
        if method in OWN_DRAFTERS:
            costs = runner.unit_costs(method, loaded[-1], k)
            for row in rows[method]:
                if row["k"] == k:
                    row.update(costs)
    ran = [(method, k) for method, k in variants  # a variant this pair cannot run gets no draws either
           if any(row["k"] == k and row["status"] == "ok" for row in rows[method])]  # fmt: skip
    draws = _lossless_draws(runner, loaded, set(split["sample_id"].head(settings.lossless_clips)), ran, settings)
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
           "draft_setup_ms", "decode_ms", "total_ms", "device", "overlapped", "status", "exact_match",
           "draft_token_ms", "target_step_ms", "verify_ms"]  # fmt: skip
LOSSLESS_COLUMNS = ["sample_id", "method", "k", "draw", "output_ids"]


def _run_one(runner: Runner, method: str, clip: Clip, k: int, settings: SpecSettings) -> dict:
    row = {"sample_id": clip.sample_id, "method": method, "k": k, "temperature": settings.temperature,
           "top_k": settings.top_k, "top_p": settings.top_p, "device": _device_name(runner.device),
           "overlapped": method == "prefill" and runner.overlapped}  # fmt: skip
    try:
        timed = runner.run(method, clip, k)
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
            "draft_setup_ms": timed.draft_setup_ms, "decode_ms": timed.decode_ms, "total_ms": timed.total_ms}  # fmt: skip


def _lossless_draws(runner: Runner | None, loaded: list[Clip], chosen: set[str], variants: list[tuple[str, int]],
                    settings: SpecSettings) -> list[dict]:  # fmt: skip
    """Sampling only: `lossless_draws` answers of `lossless_tokens` tokens per chosen clip and variant."""
    if settings.sampling.greedy or not settings.lossless_draws or runner is None:
        return []
    rows = []
    clips = [clip for clip in loaded if clip.sample_id in chosen]
    for clip in tqdm(clips, desc="lossless draws", unit="clip"):
        for method, k in [*variants, (DRAFT_ALONE, 0)]:
            for draw in range(settings.lossless_draws):
                ids = runner.run(method, clip, k, settings.lossless_tokens).decoded.output_ids
                rows.append({"sample_id": clip.sample_id, "method": method, "k": k, "draw": draw, "output_ids": ids})
    return rows


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _split_clips(data_dir: Path, settings: SpecSettings) -> pd.DataFrame:
    """The evaluated clips in a fixed order (shards deal them round-robin)."""
    manifest = pd.read_parquet(data_dir / "manifest.parquet")
    clips = manifest[manifest["split"] == settings.split].sort_values("sample_id")
    return clips.head(settings.max_clips) if settings.max_clips else clips


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
