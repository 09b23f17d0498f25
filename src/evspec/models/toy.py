"""The toy pair: EventGPT and Video-LLaVA at tiny sizes, sharing one word-level vocabulary.

The demo and the tests need a draft and a target that really answer questions about
the synthetic world, on CPU, in minutes. They are the real classes at small configs;
`evspec train-toy` trains them and `save_pair` / `load_pair` move them through a
directory laid out as the real checkpoints are:

    {directory}/draft/            EventGPT checkpoint (config.json + model.safetensors)
    {directory}/target/           Video-LLaVA checkpoint
    {directory}/draft_tokenizer/  the shared vocabulary + <ev_patch>
    {directory}/target_tokenizer/ shared + <image>, <video>, <pad>
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, VideoLlavaForConditionalGeneration

from evspec.models.checkpoint import load_draft_tokenizer, load_eventgpt, load_tokenizer, load_video_llava
from evspec.models.configs import small_vision_config, tiny_eventgpt_config, tiny_video_llava_config
from evspec.models.eventgpt import EventGPTForCausalLM
from evspec.models.prompts import VICUNA_V1_SYSTEM
from evspec.models.tokenizer import (TARGET_SPECIALS, build_shared_tokenizer, draft_tokenizer, require_tokens,
                                     target_tokenizer)
from evspec.world.scene import COLOURS, COLUMNS, DESCRIBE_WORDS, DIRECTIONS, NUMBER_WORDS, QUESTIONS, ROWS, SHAPES


@dataclass(frozen=True)
class ToyShape:
    """Sizes of the toy pair. EventGPT sees events at a higher resolution than the target's
    frames, as the real pair does (336 vs 224 px)."""

    draft_image_size: int = 64
    target_image_size: int = 48
    patch_size: int = 8
    vision_hidden_size: int = 64
    vision_layers: int = 3  # Video-LLaVA reads layer -2: two layers of vision for the target
    hidden_size: int = 64
    layers: int = 2


@dataclass
class ModelPair:
    draft: EventGPTForCausalLM
    target: VideoLlavaForConditionalGeneration
    draft_tokenizer: PreTrainedTokenizerBase
    target_tokenizer: PreTrainedTokenizerBase


def toy_corpus() -> list[str]:
    """Every text the toy pair reads or writes: prompts, questions and the answer wordings."""
    words = [*SHAPES, *COLOURS, *DIRECTIONS, *NUMBER_WORDS, *ROWS, *COLUMNS, DESCRIBE_WORDS]
    return [VICUNA_V1_SYSTEM, "USER: <ev_start> <ev_end> ASSISTANT:", *QUESTIONS.values(), " ".join(words)]


def build_toy_pair(shape: ToyShape, n_event_images: int, seed: int) -> ModelPair:
    """Fresh, randomly initialised toy pair (seeded) with its two tokenizers."""
    shared = build_shared_tokenizer(toy_corpus())
    draft_tok, target_tok = draft_tokenizer(shared), target_tokenizer(shared)
    ids = require_tokens(target_tok, TARGET_SPECIALS, "toy target tokenizer")
    torch.manual_seed(seed)
    draft = EventGPTForCausalLM(tiny_eventgpt_config(
        len(draft_tok), n_event_images, small_vision_config(shape.draft_image_size, shape.patch_size,
                                                         shape.vision_hidden_size, shape.vision_layers),
        shape.hidden_size, shape.layers))  # fmt: skip
    target = VideoLlavaForConditionalGeneration(tiny_video_llava_config(
        len(target_tok), ids["<video>"], ids["<image>"],
        small_vision_config(shape.target_image_size, shape.patch_size, shape.vision_hidden_size, shape.vision_layers),
        shape.hidden_size, shape.layers))  # fmt: skip
    for model, tokenizer in ((draft, draft_tok), (target, target_tok)):
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    return ModelPair(draft, target, draft_tok, target_tok)


def save_pair(pair: ModelPair, directory: Path) -> None:
    """Write the four parts; the caller makes `directory` appear atomically."""
    pair.draft.save_pretrained(directory / "draft")
    pair.target.save_pretrained(directory / "target")
    pair.draft_tokenizer.save_pretrained(directory / "draft_tokenizer")
    pair.target_tokenizer.save_pretrained(directory / "target_tokenizer")


def load_pair(draft: str | Path, target: str | Path, draft_tokenizer: str | Path, target_tokenizer: str | Path,
              dtype: torch.dtype = torch.float32, device: str = "cpu", draft_device: str | None = None,
              draft_pixel_dtype: str | None = None, draft_vision_tower: str | None = None) -> ModelPair:  # fmt: skip
    """Load a pair from local directories (the draft on `draft_device` if given), checking the target tokenizer."""
    target_tok = load_tokenizer(target_tokenizer)
    require_tokens(target_tok, ("<video>",), target_tokenizer)
    draft_model = load_eventgpt(draft, dtype, draft_pixel_dtype, draft_vision_tower).to(draft_device or device)
    draft_tok = load_draft_tokenizer(draft_tokenizer, draft_model.lm_head.out_features)
    return ModelPair(draft_model, load_video_llava(target, dtype).to(device), draft_tok, target_tok)
