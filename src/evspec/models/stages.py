"""One stage API for both models: encode_vision -> project -> embed the prompt -> the language engine.

The model-specific halves (vision tower, projector, prompt) live here; the language half
runs on the project's one engine (`evspec.engine.llama.LlamaEngine`) for feature extraction,
stage timing and speculation alike, so what is trained on, timed and served is the same
kernels. Tests hold the stages plus engine equal to each model's monolithic forward and
greedy `generate` (the transformers oracle), which also proves that what is timed is the
real work.

    vision = stages.encode_vision(pixel_values)        # vision tower tokens
    visual = stages.project(vision)                    # LLM-width tokens [N, H]
    ids = stages.prompt_ids(tokenizer, question)       # [1, S] on the host, one placeholder per visual token
    engine = stages.engine(max_length)                 # static cache over the model's own weights
    out = engine.prefill(stages.embed(ids, visual))    # then engine.step / engine.rewind
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, VideoLlavaForConditionalGeneration

from evspec.engine.kernels import Graphs
from evspec.engine.llama import LlamaEngine
from evspec.models.configs import n_video_tokens
from evspec.models.eventgpt import EventGPTForCausalLM
from evspec.models.prompts import eventgpt_prompt_ids, video_llava_prompt_ids
from evspec.models.splice import embed_with_visual_tokens

VIDEO_LLAVA_FRAMES = 8  # Video-LLaVA was trained on exactly 8 frames per video


class LanguageStages(ABC):
    """The LLM half shared by both models: a LLaMA decoder, its embeddings and lm_head."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Linear, placeholder_id: int) -> None:
        self.language_model = language_model
        self.lm_head = lm_head
        self.placeholder_id = placeholder_id
        self._graphs = Graphs(lm_head.weight.device)  # of `visual_tokens`, with their static pixel inputs
        self._pixels: dict[tuple, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def embed(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor | None) -> torch.Tensor:
        """Prompt embeddings [1, S, H] with the placeholders replaced by `visual_tokens` (ids on the host: no sync)."""
        return embed_with_visual_tokens(self.language_model.embed_tokens, input_ids, self.placeholder_id, visual_tokens)

    def engine(self, max_length: int, **options) -> LlamaEngine:
        """The fast engine over this model's language weights (options: `compile`, `attention`)."""
        return LlamaEngine(self.language_model, self.lm_head, max_length, **options)

    @torch.no_grad()
    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """project(encode_vision(pixels)) for one clip; on CUDA a graph per pixel shape (the towers are launch-bound
        at batch 1, so replaying one graph frees the host to queue the other model's work: `prefill` overlaps).

        On CUDA the result is the graph's static output: use it before the next call."""
        if self.device.type != "cuda":
            return self.project(self.encode_vision(pixel_values))
        key = (tuple(pixel_values.shape), pixel_values.dtype)
        if key not in self._pixels:
            self._pixels[key] = torch.empty_like(pixel_values, device=self.device)
        pixels = self._pixels[key]
        pixels.copy_(pixel_values)
        return self._graphs.run(key, lambda: self.project(self.encode_vision(pixels)), restore=lambda: None)

    @torch.no_grad()
    def greedy_with_hidden(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor | None, max_new_tokens: int,
                           eos_token_id: int | None = None, engine: LlamaEngine | None = None) -> tuple[list[int], torch.Tensor]:  # fmt: skip
        """Greedy tokens and, for each, the final hidden state [L, H] whose lm_head chose it."""
        engine = engine or self.engine(input_ids.shape[1] + max_new_tokens)
        return engine.greedy(self.embed(input_ids, visual_tokens), max_new_tokens, eos_token_id)

    @torch.no_grad()
    def teacher_forced_hidden(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor | None,
                              continuation: list[int], engine: LlamaEngine | None = None) -> torch.Tensor:  # fmt: skip
        """Hidden states [L, H] along a given continuation: row i is what predicts continuation[i]."""
        ids = torch.cat([input_ids.cpu(), torch.tensor([continuation[:-1]], dtype=input_ids.dtype)], dim=1)
        engine = engine or self.engine(ids.shape[1])
        return engine.prefill(self.embed(ids, visual_tokens)).hidden[0, -len(continuation) :]

    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | None = None) -> list[int]:  # fmt: skip
        """Greedy answer from pixels: every stage in order, as the engine runs them."""
        visual = self.project(self.encode_vision(pixel_values))
        return self.greedy_with_hidden(input_ids, visual, max_new_tokens, eos_token_id)[0]

    @abstractmethod
    def encode_vision(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def project(self, vision_tokens: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, question: str) -> torch.Tensor:
        """The model's own prompt for `question` as ids [1, S] on the host, one placeholder per visual token."""


class EventGPTStages(LanguageStages):
    """EventGPT: T event images [T, 3, S, S] -> T + P visual tokens."""

    def __init__(self, model: EventGPTForCausalLM) -> None:
        super().__init__(model.model, model.lm_head, model.config.event_placeholder_id)
        self.model = model
        self.image_size = model.config.vision_config.image_size
        self.n_images = model.config.n_event_images

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, question: str) -> torch.Tensor:
        ids = eventgpt_prompt_ids(tokenizer, question, self.model.config.n_visual_tokens, self.placeholder_id)
        return torch.tensor([ids])

    @torch.no_grad()
    def encode_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[T, 3, S, S] -> CLIP last hidden state [T, P, D] (CLS kept, before post_layernorm)."""
        return self.model.model.visual_tower(pixel_values.to(self.device))

    @torch.no_grad()
    def project(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """[T, P, D] -> projector, adaptor, spatio-temporal pooling -> [T + P, H]."""
        return self.model.model.get_event_features(vision_tokens)


class VideoLlavaStages(LanguageStages):
    """Video-LLaVA: F frames [F, 3, S, S] -> F x P video tokens (CLS kept, layer -2)."""

    def __init__(self, model: VideoLlavaForConditionalGeneration) -> None:
        super().__init__(model.model.language_model, model.lm_head, model.config.video_token_id)
        self.model = model
        self.image_size = model.config.vision_config.image_size
        self.n_images = VIDEO_LLAVA_FRAMES

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, question: str, n_frames: int | None = None) -> torch.Tensor:
        """The prompt with the video tokens of `n_frames` frames (default: Video-LLaVA's 8)."""
        ids = video_llava_prompt_ids(tokenizer, question, n_video_tokens(self.model.config, n_frames or self.n_images))
        return torch.tensor([ids])

    @torch.no_grad()
    def encode_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[F, 3, S, S] -> hidden state of `vision_feature_layer` (-2) of the video tower: [F, P, D]."""
        tower = self.model.model.video_tower
        outputs = tower(pixel_values.to(self.device, tower.dtype), output_hidden_states=True)
        return outputs.hidden_states[self.model.config.vision_feature_layer]

    @torch.no_grad()
    def project(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """[F, P, D] -> multimodal projector -> [F * P, H], frames in order."""
        projected = self.model.model.multi_modal_projector(vision_tokens)
        return projected.reshape(-1, projected.shape[-1])
