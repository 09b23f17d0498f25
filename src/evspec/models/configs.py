"""Model configs: the real 7B shapes (for timing with random weights) and tiny ones (for tests).

The 7B shapes follow REFERENCE.md: Vicuna-7B (hidden 4096, 32 layers, 32 heads,
intermediate 11008), EventGPT's CLIP ViT-L/14 at 336 px, Video-LLaVA's at 224 px,
and the shared 32000-piece vocabulary (Video-LLaVA's lm_head has 32064 rows).
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig

from evspec.models.eventgpt import EventGPTConfig

VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)  # fmt: skip
CLIP_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  patch_size=14, projection_dim=768)  # fmt: skip


def eventgpt_7b_config(n_event_images: int = 5) -> EventGPTConfig:
    """EventGPT-7B's shape: 32001 tokens (the authors add <ev_patch>), CLIP-L at 336 px."""
    return EventGPTConfig(vision_config=CLIPVisionConfig(image_size=336, **CLIP_LARGE), vocab_size=32001,
                          n_event_images=n_event_images, **VICUNA_7B)  # fmt: skip


def video_llava_7b_config() -> VideoLlavaConfig:
    """Video-LLaVA-7B-hf's shape: <image>=32000, <video>=32001, <pad>=32002, lm_head 32064 rows."""
    return VideoLlavaConfig(vision_config=CLIPVisionConfig(image_size=224, **CLIP_LARGE).to_dict(),
                            text_config=LlamaConfig(vocab_size=32064, **VICUNA_7B).to_dict(),
                            image_token_id=32000, video_token_id=32001, vision_feature_layer=-2)  # fmt: skip


def small_vision_config(image_size: int = 28, patch_size: int = 14, hidden_size: int = 32,
                        n_layers: int = 3) -> CLIPVisionConfig:  # fmt: skip
    """A small CLIP tower: the tests' (defaults) and the toy pair's (set by ToySettings)."""
    return CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=n_layers,
                            num_attention_heads=max(1, hidden_size // 16), image_size=image_size,
                            patch_size=patch_size)  # fmt: skip


def small_text_config(vocab_size: int, hidden_size: int = 32, n_layers: int = 2) -> dict:
    """A small LLaMA with grouped-query attention (kv heads = heads / 2), as a check that GQA is honoured."""
    n_heads = max(2, hidden_size // 16)
    return dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads // 2,
                max_position_embeddings=1024)  # fmt: skip


def tiny_eventgpt_config(vocab_size: int, n_event_images: int = 5, vision: CLIPVisionConfig | None = None,
                         hidden_size: int = 32, n_layers: int = 2) -> EventGPTConfig:  # fmt: skip
    """A small EventGPT for CPU tests and the toy pair."""
    return EventGPTConfig(vision_config=vision or small_vision_config(), n_event_images=n_event_images,
                          **small_text_config(vocab_size, hidden_size, n_layers))  # fmt: skip


def tiny_video_llava_config(vocab_size: int, video_token_id: int, image_token_id: int,
                            vision: CLIPVisionConfig | None = None, hidden_size: int = 32,
                            n_layers: int = 2) -> VideoLlavaConfig:  # fmt: skip
    """A small Video-LLaVA whose vocabulary ends with its special tokens, as the real one does."""
    text = LlamaConfig(**small_text_config(vocab_size, hidden_size, n_layers))
    return VideoLlavaConfig(vision_config=(vision or small_vision_config()).to_dict(), text_config=text.to_dict(),
                            image_token_id=image_token_id, video_token_id=video_token_id,
                            vision_feature_layer=-2)  # fmt: skip


def n_video_tokens(config: VideoLlavaConfig, n_frames: int = 8) -> int:
    """Video tokens in the prompt: frames x (patches + CLS); 2056 for 8 frames at 224 px."""
    vision = config.vision_config
    return n_frames * ((vision.image_size // vision.patch_size) ** 2 + 1)


def random_model(model_class: type, config, device: str | torch.device, dtype: torch.dtype):
    """A model with random weights built directly on `device` in `dtype` (7B: no fp32 copy on the host).

    Stage timing does not depend on weight values, so 7B shapes time honestly without checkpoints.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
