"""EventGPT (the draft) in transformers style: config, model, and checkpoint loading.

The authors' code (GitHub XduSyL/EventGPT) is pinned to transformers 4.37; this file
re-implements the same computation on transformers 5.x and loads the published
checkpoint's key layout:

    model.visual_tower.visual_tower.vision_model.*   CLIP ViT-L/14-336, frozen
    model.visual_projector.{0,2}                     Linear(1024, 4096), GELU, Linear(4096, 4096)
    model.feature_adaptor                            Linear(4096, 4096), per event image
    model.embed_tokens, model.layers.N, model.norm   LLaMA
    lm_head

Forward for T event images: CLIP's last hidden state (before post_layernorm, CLS
kept: [T, 577, 1024]) -> projector -> feature adaptor -> pooling into T temporal tokens
(mean over the 577 positions of each image) followed by 577 spatial tokens (mean over
the T images): T + 577 visual tokens, spliced where the prompt's `<event>` placeholder
stands, with position ids running straight through.

Unlike the authors' single -200 placeholder, the prompt here carries one placeholder
id per visual token (as transformers' LLaVA does with `<image>`), so ids and cache
positions stay aligned and `generate` works unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, GenerationMixin, LlamaConfig, LlamaModel, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from evspec.models.compat import CACHE_KWARG
from evspec.models.splice import embed_with_visual_tokens

EVENT_PLACEHOLDER_ID = -200  # the authors' IMAGE/EVENT token index


class EventGPTConfig(LlamaConfig):
    """LLaMA config plus the event vision tower; `model_type` matches the published checkpoint."""

    model_type = "EventChat_llama"

    def __init__(
        self,
        vision_config: dict | CLIPVisionConfig | None = None,
        mm_visual_tower: str = "openai/clip-vit-large-patch14-336",
        event_feature_adaptor: bool = True,
        n_event_images: int = 5,
        event_placeholder_id: int = EVENT_PLACEHOLDER_ID,
        pixel_dtype: str | None = None,
        **kwargs,
    ) -> None:
        if vision_config is None:  # the published config names the tower; its shape is CLIP ViT-L/14-336
            vision_config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                             num_attention_heads=16, image_size=336, patch_size=14,
                                             projection_dim=768)  # fmt: skip
        elif isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**vision_config)
        self.vision_config = vision_config
        self.mm_visual_tower = mm_visual_tower
        self.event_feature_adaptor = event_feature_adaptor
        self.n_event_images = n_event_images
        self.event_placeholder_id = event_placeholder_id
        # pixels are cast to this dtype before the tower ("bfloat16" is what the authors' code does,
        # whatever the model's dtype); None keeps the model's own dtype
        self.pixel_dtype = pixel_dtype
        super().__init__(**kwargs)
        if n_event_images < 1:
            raise ValueError(f"n_event_images must be >= 1, got {n_event_images}")

    @property
    def tokens_per_image(self) -> int:
        """CLIP tokens per image: patches plus CLS (577 at 336 px, patch 14)."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2 + 1

    @property
    def n_visual_tokens(self) -> int:
        """Visual tokens after pooling: T temporal + the spatial ones (582 for T=5 at 336 px)."""
        return self.n_event_images + self.tokens_per_image

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        return output


class EventVisualTower(nn.Module):
    """Holds CLIP under the attribute name the checkpoint uses (`visual_tower.visual_tower.*`)."""

    def __init__(self, config: CLIPVisionConfig, pixel_dtype: str | None = None) -> None:
        super().__init__()
        self.visual_tower = CLIPVisionModel(config)
        self.pixel_dtype = getattr(torch, pixel_dtype) if pixel_dtype else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # [T, 3, S, S] -> last hidden state before post_layernorm, CLS kept: [T, 1 + patches, D]
        if self.pixel_dtype is not None:
            pixel_values = pixel_values.to(self.pixel_dtype)
        return self.visual_tower(pixel_values=pixel_values.to(self.visual_tower.dtype)).last_hidden_state


class EventGPTModel(LlamaModel):
    """LLaMA plus the event tower, projector and adaptor, named as in the checkpoint."""

    config_class = EventGPTConfig

    def __init__(self, config: EventGPTConfig) -> None:
        super().__init__(config)
        self.visual_tower = EventVisualTower(config.vision_config, getattr(config, "pixel_dtype", None))
        self.visual_projector = nn.Sequential(
            nn.Linear(config.vision_config.hidden_size, config.hidden_size),
            nn.GELU(),  # exact (erf) GELU, as the authors' code
            nn.Linear(config.hidden_size, config.hidden_size),
        )
        self.feature_adaptor = nn.Linear(config.hidden_size, config.hidden_size) if config.event_feature_adaptor else None
        self.post_init()

    def get_event_features(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """Project and pool tower output [..., T, P, D] into visual tokens [..., T + P, H] per window."""
        projected = self.visual_projector(vision_tokens.to(self.visual_projector[0].weight.dtype))
        if self.feature_adaptor is not None:
            projected = self.feature_adaptor(projected)
        temporal = projected.mean(dim=-2)  # [..., T, H]: one token per event image
        spatial = projected.mean(dim=-3)  # [..., P, H]: one token per position, CLS first
        return torch.cat([temporal, spatial], dim=-2)


class EventGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = EventGPTConfig
    base_model_prefix = "model"
    _supports_sdpa = True  # the authors' LLaMA runs SDPA (transformers' default where a model allows it)
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer"]

    def __init__(self, config: EventGPTConfig) -> None:
        super().__init__(config)
        self.model = EventGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        event_pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Monolithic forward on event images [T, 3, S, S] (one window for the batch) or [B, T, 3, S, S].

        The images are encoded only when the ids hold placeholders (the prefill, not later steps).
        """
        if inputs_embeds is None:
            event_tokens = None
            if event_pixel_values is not None and bool((input_ids == self.config.event_placeholder_id).any()):
                pixels = event_pixel_values.flatten(0, -4)  # [B * T, 3, S, S]
                vision = self.model.visual_tower(pixels).unflatten(0, event_pixel_values.shape[:-3])
                event_tokens = self.model.get_event_features(vision)
            inputs_embeds = embed_with_visual_tokens(self.model.embed_tokens, input_ids,
                                                     self.config.event_placeholder_id, event_tokens)  # fmt: skip
        cache = kwargs.pop(CACHE_KWARG, None)
        outputs = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=use_cache, **{CACHE_KWARG: cache}, **kwargs)  # fmt: skip
        hidden = outputs.last_hidden_state
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return CausalLMOutputWithPast(logits=logits, hidden_states=outputs.hidden_states,
                                      **{CACHE_KWARG: getattr(outputs, CACHE_KWARG)})  # fmt: skip
