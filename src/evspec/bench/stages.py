"""`python -m evspec bench-stages`: what each stage of each model costs, through the stage API.

Per model and image count (EventGPT: 1 and 5 event images; Video-LLaVA: 1 and 8 frames):
vision encoding, projection (EventGPT: projector + feature adaptor + pooling), the two as
serving runs them (`vision_served`: one CUDA graph per pixel shape on GPU), LLM prefill of
the whole prompt and one decode step on the language engine that serving runs
(`evspec.engine.llama`), and the step's physical floor (language-model weights + the context's
K/V over the copy bandwidth measured here); for the target, the verify of k + 1 tokens and
one draft-head token (a proposal of k by the head engine, / k), one level of the head's draft tree (a proposal of
`head_tree`'s depth x top-k tree, its best nodes chosen, / depth), and the verify of [last] + a tree of 16,
32 and 64 drafts in one forward (`LlamaEngine.step_tree`; EAGLE-2 verifies trees of this size). Timed by `evspec.timing`
after warm-up, medians of repeats; the host-to-device copy of the pixels is timed separately
and disk reads are not timed at all. Because these are the stage API's and the engine's
calls, the tests that prove them equal to the monolithic models also prove this times the
real work.

Scales: `pair` loads the run's own pair (the demo's toy pair, or the configured checkpoints); `7b` builds both models at 7B shape with random
weights (bf16 on GPU). Prompt text lengths at 7B are the real prompts' (REFERENCE.md:
about 640 and 2075 tokens in all), configurable because LLaMA's tokenizer is not shipped.
"""

from __future__ import annotations

import functools
import logging
import statistics
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
from evspec.models.stages import EventGPTStages, LanguageStages, VideoLlavaStages
from evspec.models.toy import load_pair
from evspec.engine.head import HeadEngine
from evspec.speculative.sampling import Sampler
from evspec.timing import measure_ms
from evspec.world.scene import QUESTIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchSettings:
    scale: str = "pair"  # "pair": the run's pair (toy or checkpoints); "7b": random weights at 7B shape
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool | None = None  # the engines' torch.compile (None: on CUDA)
    repeats: int = 20
    warmup: int = 3
    eventgpt_images: list[int] = field(default_factory=lambda: [1, 5])
    video_llava_frames: list[int] = field(default_factory=lambda: [1, 8])
    text_tokens_7b: dict[str, int] = field(default_factory=lambda: {"eventgpt": 58, "video_llava": 19})
    verify_lengths: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # k: the target verifies k + 1 tokens
    tree_sizes: list[int] = field(default_factory=lambda: [16, 32, 64])  # drafts in a tree verified with its root
    head_tree: list[int] = field(default_factory=lambda: [4, 4, 16])  # the head's tree timed: depth, top-k, nodes
    threads: int = 2


def bench_stages(settings: BenchSettings, pair_paths: dict[str, Path] | None, out_path: Path,
                 head: DraftHead | None = None) -> pd.DataFrame:  # fmt: skip
    """Time every stage; `pair_paths` (draft, target, draft_tokenizer, target_tokenizer) for the `pair`
    scale; `head` is a trained draft head, else one of EAGLE's size is built."""
    torch.set_num_threads(settings.threads)
    device, dtype = torch.device(settings.device), DTYPES[settings.dtype]
    timer = functools.partial(measure_ms, devices=[device], repeats=settings.repeats, warmup=settings.warmup)
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
                    settings: BenchSettings, timer, device: torch.device, dtype: torch.dtype) -> list[dict]:  # fmt: skip
    """The target's (k+1)-token verify, and one draft-head token per k, after a real-length prefill."""
    size = stages.image_size
    visual = stages.project(stages.encode_vision(torch.randn(n_images, 3, size, size, dtype=dtype, device=device)))
    ids = _prompt_ids("video_llava", stages, tokenizer, visual.shape[0], settings)
    longest = max(settings.verify_lengths)
    engine = stages.engine(ids.shape[1] + max(longest, *settings.tree_sizes) + 8, compile=settings.compile)
    prefill = engine.prefill(stages.embed(ids, visual))
    token = prefill.logits[:, -1].argmax(-1).view(1, 1)
    length = ids.shape[1]

    def verify(n):
        engine.step(token.expand(1, n))
        engine.rewind(length)

    def tree_verify(n):  # [last] + n drafts in one forward with tree attention
        engine.step_tree(token.expand(1, n + 1), tree_parents(n))
        engine.rewind(length)

    measured = {("verify", k): timer(lambda k=k: verify(k + 1)) for k in settings.verify_lengths}
    measured.update({("tree_verify", n): timer(lambda n=n: tree_verify(n)) for n in settings.tree_sizes})
    hidden = stages.lm_head.in_features
    head = (head or DraftHead(eagle_head_config(stages.language_model.config, draft_size))).to(device, dtype).eval()
    n_events = 582 if settings.scale == "7b" else 70
    answered = 20  # the head drafts 20 tokens into the answer (its cost is flat in the answer's length)
    depth, top_k, nodes = settings.head_tree
    cycles = (settings.repeats + settings.warmup) * (len(settings.verify_lengths) + 1)  # each commits one token
    head_engine = HeadEngine(head, stages.language_model.embed_tokens, stages.lm_head, n_events, answered + cycles + 8,
                             max(longest, depth * top_k), Sampler(), compile=settings.compile)  # fmt: skip
    head_engine.load_events(torch.randn(n_events, draft_size, device=device, dtype=dtype))
    head_engine.start(int(token), prefill.hidden[0, -1])
    head_engine.commit(list(range(4, 4 + answered)), torch.randn(answered, hidden, device=device, dtype=dtype))
    state = prefill.hidden[0, -1:].clone()
    for k in settings.verify_lengths:
        def cycle(k=k):  # a proposal and the commit of one token (every draft rejected)
            head_engine.propose(k)
            head_engine.commit([int(token)], state)

        measured[("draft_head_token", k)] = [ms / k for ms in timer(cycle)]

    def tree_cycle():  # a proposal of the head's tree (as feature-tree drafts it) and the commit of one token
        head_engine.draft_tree(depth, top_k, nodes)
        head_engine.commit([int(token)], state)

    measured[("draft_head_tree", depth)] = [ms / depth for ms in timer(tree_cycle)]  # per level, as c is per token
    sizes = {"head_parameters": _parameters(head), "target_language_parameters": language_parameters(stages),
             "eagle_head_share_at_7b": head_share_at_7b()}  # the reference the report sets the ratio beside
    extra = {"draft_head_token": sizes, "draft_head_tree": {"tree_top_k": top_k, "tree_nodes": nodes}}
    return [_row("video_llava", n_images, stage, times, length, visual.shape[0], settings, device, k=k,
                 **extra.get(stage, {}))
            for (stage, k), times in measured.items()]  # fmt: skip


def tree_parents(n_drafts: int, branching: int = 4) -> list[int]:
    """Parents for `step_tree` of [last] + n drafts as a full `branching`-ary tree under `last` (node 0): what a
    verify of that many tokens costs depends on their count, not on the tree's shape."""
    return [-1] + [(node - 1) // branching for node in range(1, n_drafts + 1)]


def eagle_head_config(language_config, event_size: int) -> HeadConfig:
    """A head of EAGLE's size for a target language model: one full decoder layer of its width."""
    hidden = language_config.hidden_size
    return HeadConfig(hidden_size=hidden, event_size=event_size, n_heads=language_config.num_attention_heads,
                      intermediate_size=language_config.intermediate_size, adapter_hidden_size=hidden)  # fmt: skip


def head_share_at_7b() -> float:
    """An EAGLE-sized head's parameters over Video-LLaVA-7B's language model's (lm_head included), counted
    on the meta device from the configs: the ratio the miniature's head should have."""
    with torch.device("meta"):
        target = VideoLlavaForConditionalGeneration(video_llava_7b_config())
        head = DraftHead(eagle_head_config(target.config.text_config, eventgpt_7b_config().hidden_size))
    return _parameters(head) / language_parameters(VideoLlavaStages(target))


def language_parameters(stages: LanguageStages) -> int:
    """The language model's parameters a decode step reads: its layers, norms and lm_head."""
    return _parameters(stages.language_model) + stages.lm_head.weight.numel()


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _row(model: str, n_images: int, stage: str, times: list[float], prefill_tokens: int, visual_tokens: int,
         settings: BenchSettings, device: torch.device, k: int = 0, **sizes: float) -> dict:  # fmt: skip
    """One stage's timing; `sizes`: the parameter counts the row's stage is about (the head's rows)."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"model": model, "images": n_images, "stage": stage, "k": k, "ms_median": statistics.median(times),
            "ms_p10": _quantile(times, 0.1), "ms_p90": _quantile(times, 0.9), "repeats": len(times),
            "prefill_tokens": prefill_tokens, "visual_tokens": visual_tokens, "scale": settings.scale,
            "dtype": settings.dtype, "device": device_name, **sizes}  # fmt: skip


def _prompt_ids(name: str, stages: LanguageStages, tokenizer, n_visual: int, settings: BenchSettings) -> torch.Tensor:
    """The real prompt (toy: the demo tokenizer) or, at 7B, the real prompt's text length around the visual ids."""
    if tokenizer is not None:
        ids = stages.prompt_ids(tokenizer, QUESTIONS["describe"])[0].tolist()
        text = [i for i in ids if i != stages.placeholder_id]
        return torch.tensor([[text[0], *[stages.placeholder_id] * n_visual, *text[1:]]])
    n_text = settings.text_tokens_7b[name]
    text = torch.randint(3, 32000, (n_text,)).tolist()
    return torch.tensor([[1, *[stages.placeholder_id] * n_visual, *text[1:]]])


@torch.no_grad()
def copy_bandwidth(device: torch.device, timer) -> float:
    """Bytes per second of a copy on `device` (read + write counted): the floor's denominator, here and in
    benchmarks/decode.py. 2 GiB on a GPU (a smaller copy counts its launch as lost bandwidth), 256 MiB on a CPU."""
    source = torch.empty((2**30 if device.type == "cuda" else 2**27), dtype=torch.float16, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() * source.element_size() / (statistics.median(timer(lambda: target.copy_(source))) / 1000)


def step_weight_bytes(language_model: torch.nn.Module, lm_head: torch.nn.Linear) -> int:
    """The weights one decode step reads: every layer, the final norm and lm_head; of the embedding table one row,
    so it is left out."""
    return sum(p.numel() * p.element_size() for name, p in language_model.named_parameters()
               if not name.startswith("embed_tokens")) + lm_head.weight.numel() * lm_head.weight.element_size()  # fmt: skip


def decode_floor_ms(stages: LanguageStages, context_tokens: int, bandwidth: float) -> float:
    """One decode step's physical floor: the weights it reads + the context's K/V, read once."""
    config = stages.language_model.config
    weights = step_weight_bytes(stages.language_model, stages.lm_head)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context_tokens * stages.lm_head.weight.element_size()
    return (weights + kv) / bandwidth * 1000


def _bench_model(name: str, stages: LanguageStages, tokenizer, n_images: int, settings: BenchSettings, timer,
                 device: torch.device, dtype: torch.dtype, bandwidth: float) -> list[dict]:  # fmt: skip
    size = stages.image_size
    pixels_host = torch.randn(n_images, 3, size, size, dtype=dtype)
    pixels = pixels_host.to(device)
    vision = stages.encode_vision(pixels)
    visual = stages.project(vision)  # EventGPT pools the n_images of one window: T = n_images
    ids = _prompt_ids(name, stages, tokenizer, visual.shape[0], settings)
    length = ids.shape[1]
    engine = stages.engine(length + 8, compile=settings.compile)
    embeds = stages.embed(ids, visual)
    token = engine.prefill(embeds).logits[:, -1].argmax(-1).view(1, 1)

    def decode():
        engine.step(token)
        engine.rewind(length)

    measured = {
        "host_to_device": timer(lambda: pixels_host.to(device, non_blocking=False)),
        "vision": timer(lambda: stages.encode_vision(pixels)),
        "projector": timer(lambda: stages.project(vision)),
        "vision_served": timer(lambda: stages.visual_tokens(pixels)),  # both as serving runs them (a graph on CUDA)
        "prefill": timer(lambda: engine.prefill(embeds)),
        "decode_step": timer(decode),
    }
    measured["decode_floor"] = [decode_floor_ms(stages, length, bandwidth)]  # computed, not timed
    return [_row(name, n_images, stage, times, length, visual.shape[0], settings, device)
            for stage, times in measured.items()]  # fmt: skip


def _quantile(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
