"""`python -m evspec bench-stages`: what each stage of each model costs, through the stage API.

Per model and image count (EventGPT: 1 and 5 event images; Video-LLaVA: 1 and 8 frames):
vision encoding, projection (EventGPT: projector + feature adaptor + pooling), LLM prefill of
the whole prompt, one decode step (the stage API's, and the fast engine's) and its physical
floor (language-model weights + the context's K/V over the copy bandwidth measured here). Timed after
warm-up, medians of repeats, CUDA events on GPU; the host-to-device copy of the pixels is
timed separately and disk reads are not timed at all. Because these are the stage API's
calls, the test that proves decoupled == monolithic also proves this times the real work.

Scales: `pair` loads the run's own pair (the demo's toy pair, or the configured checkpoints); `7b` builds both models at 7B shape with random
weights (bf16 on GPU). Prompt text lengths at 7B are the real prompts' (REFERENCE.md:
about 640 and 2075 tokens in all), configurable because LLaMA's tokenizer is not shipped.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from transformers import VideoLlavaForConditionalGeneration

from evspec.adapter.modules import DraftHead, HeadConfig
from evspec.atomic import atomic_output
from evspec.errors import InputError
from evspec.models.configs import eventgpt_7b_config, random_model, video_llava_7b_config
from evspec.models.checkpoint import DTYPES
from evspec.models.eventgpt import EventGPTForCausalLM
from evspec.models.splice import embed_with_visual_tokens
from evspec.models.stages import EventGPTStages, LanguageStages, VideoLlavaStages
from evspec.models.toy import load_pair
from evspec.spec.drafters import HeadDrafter
from evspec.spec.fast_llama import FastLlama
from evspec.spec.sampling import Sampler
from evspec.world.scene import QUESTIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchSettings:
    scale: str = "pair"  # "pair": the run's pair (toy or checkpoints); "7b": random weights at 7B shape
    device: str = "cpu"
    dtype: str = "float32"
    repeats: int = 20
    warmup: int = 3
    eventgpt_images: list[int] = field(default_factory=lambda: [1, 5])
    video_llava_frames: list[int] = field(default_factory=lambda: [1, 8])
    text_tokens_7b: dict[str, int] = field(default_factory=lambda: {"eventgpt": 58, "video_llava": 19})
    verify_lengths: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # k: the target verifies k + 1 tokens
    threads: int = 2


class Timer:
    def __init__(self, device: torch.device, repeats: int, warmup: int) -> None:
        self.device, self.repeats, self.warmup = device, repeats, warmup

    def __call__(self, function: Callable[[], object]) -> list[float]:
        """Milliseconds of each repeat after warm-up (synchronised, CUDA events on GPU)."""
        for _ in range(self.warmup):
            function()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                function()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                started = time.perf_counter()
                function()
                times.append((time.perf_counter() - started) * 1000)
        return times


def bench_stages(settings: BenchSettings, pair_paths: dict[str, Path] | None, out_path: Path,
                 head: DraftHead | None = None) -> pd.DataFrame:  # fmt: skip
    """Time every stage; `pair_paths` (draft, target, draft_tokenizer, target_tokenizer) for the `pair`
    scale; `head` is a trained draft head, else one of EAGLE's size is built."""
    torch.set_num_threads(settings.threads)
    device, dtype = torch.device(settings.device), DTYPES[settings.dtype]
    timer = Timer(device, settings.repeats, settings.warmup)
    if settings.scale == "pair":
        if pair_paths is None:
            raise InputError("--draft", "the pair scale times the run's own checkpoints: give their directories")
        pair = load_pair(**pair_paths, dtype=dtype, device=settings.device)
        models = [("eventgpt", EventGPTStages(pair.draft), pair.draft_tokenizer),
                  ("video_llava", VideoLlavaStages(pair.target), pair.target_tokenizer)]  # fmt: skip
    elif settings.scale == "7b":
        models = [("eventgpt", EventGPTStages(random_model(EventGPTForCausalLM, eventgpt_7b_config(), device, dtype)), None),
                  ("video_llava", VideoLlavaStages(random_model(VideoLlavaForConditionalGeneration,
                                                                video_llava_7b_config(), device, dtype)), None)]  # fmt: skip
    else:
        raise ValueError(f"scale must be 'pair' or '7b', got {settings.scale!r}")
    bandwidth = copy_bandwidth(device, timer)
    rows = []
    for name, stages, tokenizer in models:
        counts = settings.eventgpt_images if name == "eventgpt" else settings.video_llava_frames
        for n_images in counts:
            rows += _bench_model(name, stages, tokenizer, n_images, settings, timer, device, dtype, bandwidth)
        if name == "video_llava":  # what a speculative cycle costs the target, and the head's draft token
            draft_size = models[0][1].model.config.hidden_size
            rows += _bench_drafting(stages, tokenizer, max(counts), draft_size, head, settings, timer, device, dtype)
        if settings.scale == "7b":
            stages.model.to("cpu")  # make room for the next model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    frame = pd.DataFrame(rows)
    with atomic_output(out_path) as temporary:
        frame.to_parquet(temporary, index=False)
    log.info("\n%s", frame[["model", "images", "stage", "k", "ms_median", "prefill_tokens"]].to_string(index=False))
    return frame


@torch.no_grad()
def _bench_drafting(stages: LanguageStages, tokenizer, n_images: int, draft_size: int, head: DraftHead | None,
                    settings: BenchSettings, timer: Timer, device: torch.device, dtype: torch.dtype) -> list[dict]:  # fmt: skip
    """The target's (k+1)-token verify on the fast engine, and one draft-head token, after a real-length prefill."""
    size = stages.image_size
    visual = stages.project(stages.encode_vision(torch.randn(n_images, 3, size, size, dtype=dtype, device=device)))
    ids = _prompt_ids("video_llava", stages, tokenizer, visual.shape[0], settings)
    engine = FastLlama(stages.language_model, stages.lm_head, ids.shape[1] + max(settings.verify_lengths) + 8)
    embeds = embed_with_visual_tokens(stages.language_model.embed_tokens, ids, stages.placeholder_id, visual)
    prefill = engine.forward_embeds(embeds)
    token = prefill.logits[:, -1].argmax(-1).view(1, 1)
    length = ids.shape[1]

    def verify(n):
        engine.step(token.expand(1, n))
        engine.rewind(length)

    measured = {("verify", k): timer(lambda k=k: verify(k + 1)) for k in settings.verify_lengths}
    hidden = stages.lm_head.in_features
    if head is None:  # EAGLE's size: one full decoder layer of the target's width
        config = HeadConfig(hidden_size=hidden, event_size=draft_size, n_heads=stages.language_model.config.num_attention_heads,
                            intermediate_size=stages.language_model.config.intermediate_size, adapter_hidden_size=hidden)  # fmt: skip
        head = DraftHead(config)
    head = head.to(device, dtype).eval()
    n_events = 582 if settings.scale == "7b" else 70
    drafter = HeadDrafter(head, torch.randn(n_events, draft_size, device=device, dtype=dtype),
                          stages.language_model.embed_tokens, stages.lm_head, Sampler())  # fmt: skip
    drafter.start(int(token), prefill.hidden[0, -1])
    drafter.commit(list(range(4, 23)), torch.randn(19, hidden, device=device, dtype=dtype))  # 20 answer tokens so far
    measured[("draft_head_step", 0)] = timer(lambda: drafter.propose(1))
    return [_row("video_llava", n_images, stage, times, length, visual.shape[0], settings, device, k=k)
            for (stage, k), times in measured.items()]  # fmt: skip


def _row(model: str, n_images: int, stage: str, times: list[float], prefill_tokens: int, visual_tokens: int,
         settings: BenchSettings, device: torch.device, k: int = 0) -> dict:  # fmt: skip
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"model": model, "images": n_images, "stage": stage, "k": k, "ms_median": statistics.median(times),
            "ms_p10": _quantile(times, 0.1), "ms_p90": _quantile(times, 0.9), "repeats": len(times),
            "prefill_tokens": prefill_tokens, "visual_tokens": visual_tokens, "scale": settings.scale,
            "dtype": settings.dtype, "device": device_name}  # fmt: skip


def _prompt_ids(name: str, stages: LanguageStages, tokenizer, n_visual: int, settings: BenchSettings) -> torch.Tensor:
    """The real prompt (toy: the demo tokenizer) or, at 7B, the real prompt's text length around the visual ids."""
    if tokenizer is not None:
        ids = stages.prompt_ids(tokenizer, QUESTIONS["describe"])[0].tolist()
        text = [i for i in ids if i != stages.placeholder_id]
        return torch.tensor([[text[0], *[stages.placeholder_id] * n_visual, *text[1:]]], device=stages.device)
    n_text = settings.text_tokens_7b[name]
    text = torch.randint(3, 32000, (n_text,)).tolist()
    return torch.tensor([[1, *[stages.placeholder_id] * n_visual, *text[1:]]], device=stages.device)


@torch.no_grad()
def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """Bytes per second of a 256 MiB copy on `device` (read + write counted): the floor's denominator."""
    source = torch.empty(2**27, dtype=torch.float16, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() * source.element_size() / (statistics.median(timer(lambda: target.copy_(source))) / 1000)


def decode_floor_ms(stages: LanguageStages, context_tokens: int, bandwidth: float) -> float:
    """One decode step's physical floor: the language model's weights + the context's K/V, read once."""
    config = stages.language_model.config
    weights = sum(p.numel() * p.element_size() for p in stages.language_model.parameters())
    weights += stages.lm_head.weight.numel() * stages.lm_head.weight.element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context_tokens * stages.lm_head.weight.element_size()
    return (weights + kv) / bandwidth * 1000


def _bench_model(name: str, stages: LanguageStages, tokenizer, n_images: int, settings: BenchSettings, timer: Timer,
                 device: torch.device, dtype: torch.dtype, bandwidth: float) -> list[dict]:  # fmt: skip
    size = stages.image_size
    pixels_host = torch.randn(n_images, 3, size, size, dtype=dtype)
    pixels = pixels_host.to(device)
    vision = stages.encode_vision(pixels)
    visual = stages.project(vision)  # EventGPT pools the n_images of one window: T = n_images
    ids = _prompt_ids(name, stages, tokenizer, visual.shape[0], settings)
    cache_holder = {}

    def prefill():
        cache_holder["cache"] = stages.new_cache()
        return stages.prefill(ids, visual, cache_holder["cache"])

    first = prefill()
    token = first.logits[:, -1].argmax(-1).view(1, 1)
    length = ids.shape[1]

    def decode():
        stages.decode_step(token, cache_holder["cache"])
        stages.rollback(cache_holder["cache"], length)

    engine = FastLlama(stages.language_model, stages.lm_head, length + 8)
    engine.forward_embeds(embed_with_visual_tokens(stages.language_model.embed_tokens, ids, stages.placeholder_id, visual))

    def fast_decode():
        engine.step(token)
        engine.rewind(length)

    measured = {
        "host_to_device": timer(lambda: pixels_host.to(device, non_blocking=False)),
        "vision": timer(lambda: stages.encode_vision(pixels)),
        "projector": timer(lambda: stages.project(vision)),
        "prefill": timer(prefill),
        "decode_step": timer(decode),
        "decode_step_fast_engine": timer(fast_decode),
    }
    measured["decode_floor"] = [decode_floor_ms(stages, length, bandwidth)]  # computed, not timed
    return [_row(name, n_images, stage, times, length, visual.shape[0], settings, device)
            for stage, times in measured.items()]  # fmt: skip


def _quantile(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
