"""One stage API for both models: encode_vision -> project -> prefill -> decode_step / verify.

The benchmark and the speculative engine call these and nothing else, so the test that
proves the stages reproduce each model's monolithic forward and greedy `generate` also
proves that what is timed is the real work.

    vision = stages.encode_vision(pixel_values)        # vision tower tokens
    visual = stages.project(vision)                    # LLM-width tokens [N, H]
    cache = stages.new_cache()
    step = stages.prefill(prompt_ids, visual, cache)   # the prompt, placeholders spliced
    step = stages.decode_step(next_id, cache)          # one token
    step = stages.verify(draft_ids, cache)             # k tokens in one forward
    stages.rollback(cache, accepted_length)            # drop rejected entries

Positions continue from the cache's length; every step returns logits and final
hidden states for all positions it ran.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase, VideoLlavaForConditionalGeneration

from evspec.models.compat import CACHE_KWARG
from evspec.models.configs import n_video_tokens
from evspec.models.eventgpt import EventGPTForCausalLM
from evspec.models.prompts import eventgpt_prompt_ids, video_llava_prompt_ids
from evspec.models.splice import embed_with_visual_tokens

VIDEO_LLAVA_FRAMES = 8  # Video-LLaVA was trained on exactly 8 frames per video


@dataclass
class StepOutput:
    logits: torch.Tensor  # [1, n, V]
    hidden: torch.Tensor  # [1, n, H], after the final norm: what lm_head reads


class LanguageStages(ABC):
    """The LLM half shared by both models: a LLaMA decoder, its embeddings and lm_head."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Linear, placeholder_id: int) -> None:
        self.language_model = language_model
        self.lm_head = lm_head
        self.placeholder_id = placeholder_id

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def new_cache(self) -> DynamicCache:
        return DynamicCache()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor | None, cache: DynamicCache) -> StepOutput:
        """Run the whole prompt [1, S] (placeholders replaced by `visual_tokens`) into an empty cache."""
        if cache.get_seq_length() != 0:
            raise ValueError("prefill needs an empty cache")
        embeds = embed_with_visual_tokens(self.language_model.embed_tokens, input_ids, self.placeholder_id, visual_tokens)
        return self._forward(embeds, cache)

    @torch.no_grad()
    def decode_step(self, token_id: torch.Tensor, cache: DynamicCache) -> StepOutput:
        """One token [1, 1] after what the cache holds."""
        return self._forward(self.language_model.embed_tokens(token_id), cache)

    @torch.no_grad()
    def verify(self, token_ids: torch.Tensor, cache: DynamicCache) -> StepOutput:
        """k tokens [1, k] in one forward: logits[:, i] is the prediction after token i."""
        return self._forward(self.language_model.embed_tokens(token_ids), cache)

    @staticmethod
    def rollback(cache: DynamicCache, length: int) -> None:
        """Forget cache entries from position `length` on (rejected draft tokens).

        A negative `crop` (remove that many) means the same on every supported release.
        """
        excess = cache.get_seq_length() - length
        if excess < 0:
            raise ValueError(f"cannot roll back a cache of {cache.get_seq_length()} tokens to {length}")
        if excess:
            cache.crop(-excess)

    def _forward(self, embeds: torch.Tensor, cache: DynamicCache) -> StepOutput:
        start = cache.get_seq_length()
        positions = torch.arange(start, start + embeds.shape[1], device=embeds.device)[None]
        outputs = self.language_model(inputs_embeds=embeds, position_ids=positions, use_cache=True, **{CACHE_KWARG: cache})
        hidden = outputs.last_hidden_state
        return StepOutput(logits=self.lm_head(hidden), hidden=hidden)

    @torch.no_grad()
    def greedy(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor | None, max_new_tokens: int,
               eos_token_id: int | None = None) -> list[int]:  # fmt: skip
        """Greedy decoding through prefill + decode_step: the reference the engine must equal."""
        return self.greedy_with_hidden(input_ids, visual_tokens, max_new_tokens, eos_token_id)[0]

    @torch.no_grad()
    def greedy_with_hidden(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor | None, max_new_tokens: int,
                           eos_token_id: int | None = None) -> tuple[list[int], torch.Tensor]:  # fmt: skip
        """Greedy tokens and, for each, the final hidden state [L, H] whose lm_head chose it."""
        cache = self.new_cache()
        step = self.prefill(input_ids, visual_tokens, cache)
        tokens: list[int] = []
        hidden: list[torch.Tensor] = []
        while True:
            next_id = int(step.logits[0, -1].argmax())
            tokens.append(next_id)
            hidden.append(step.hidden[0, -1])
            if next_id == eos_token_id or len(tokens) == max_new_tokens:
                return tokens, torch.stack(hidden)
            step = self.decode_step(torch.tensor([[next_id]], device=self.device), cache)

    @torch.no_grad()
    def teacher_forced_hidden(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor | None,
                              continuation: list[int]) -> torch.Tensor:  # fmt: skip
        """Hidden states [L, H] along a given continuation: row i is what predicts continuation[i]."""
        forced = torch.tensor([continuation[:-1]], dtype=input_ids.dtype, device=input_ids.device)
        step = self.prefill(torch.cat([input_ids, forced], dim=1), visual_tokens, self.new_cache())
        return step.hidden[0, -len(continuation) :]

    @abstractmethod
    def encode_vision(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def project(self, vision_tokens: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, question: str) -> torch.Tensor:
        """The model's own prompt for `question` as ids [1, S], one placeholder per visual token."""

    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | None = None) -> list[int]:  # fmt: skip
        """Greedy answer from pixels: every stage in order, as the engine runs them."""
        return self.greedy(input_ids, self.project(self.encode_vision(pixel_values)), max_new_tokens, eos_token_id)


class EventGPTStages(LanguageStages):
    """EventGPT: T event images [T, 3, S, S] -> T + P visual tokens."""

    def __init__(self, model: EventGPTForCausalLM) -> None:
        super().__init__(model.model, model.lm_head, model.config.event_placeholder_id)
        self.model = model
        self.image_size = model.config.vision_config.image_size
        self.n_images = model.config.n_event_images

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, question: str) -> torch.Tensor:
        ids = eventgpt_prompt_ids(tokenizer, question, self.model.config.n_visual_tokens, self.placeholder_id)
        return torch.tensor([ids], device=self.device)

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

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, question: str) -> torch.Tensor:
        ids = video_llava_prompt_ids(tokenizer, question, n_video_tokens(self.model.config, self.n_images))
        return torch.tensor([ids], device=self.device)

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
