"""Model configs: the real 7B shapes (for timing with random weights) and tiny ones (for tests).

The 7B shapes follow REFERENCE.md: Vicuna-7B (hidden 4096, 32 layers, 32 heads,
intermediate 11008), EventGPT's CLIP ViT-L/14 at 336 px, Video-LLaVA's at 224 px,
and the shared 32000-piece vocabulary (Video-LLaVA's lm_head has 32064 rows).
"""

from __future__ import annotations

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


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28,
                   patch_size=14)  # fmt: skip
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip


def tiny_eventgpt_config(vocab_size: int, n_event_images: int = 5) -> EventGPTConfig:
    """A few-thousand-parameter EventGPT for CPU tests (grouped-query attention on purpose)."""
    return EventGPTConfig(vision_config=CLIPVisionConfig(**TINY_VISION), vocab_size=vocab_size,
                          n_event_images=n_event_images, **TINY_TEXT)  # fmt: skip


def tiny_video_llava_config(vocab_size: int, video_token_id: int, image_token_id: int) -> VideoLlavaConfig:
    """A tiny Video-LLaVA whose vocabulary ends with its special tokens, as the real one does."""
    return VideoLlavaConfig(vision_config=CLIPVisionConfig(**TINY_VISION).to_dict(),
                            text_config=LlamaConfig(vocab_size=vocab_size, **TINY_TEXT).to_dict(),
                            image_token_id=image_token_id, video_token_id=video_token_id,
                            vision_feature_layer=-2)  # fmt: skip


def n_video_tokens(config: VideoLlavaConfig, n_frames: int = 8) -> int:
    """Video tokens in the prompt: frames x (patches + CLS); 2056 for 8 frames at 224 px."""
    vision = config.vision_config
    return n_frames * ((vision.image_size // vision.patch_size) ** 2 + 1)
