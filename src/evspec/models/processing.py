"""CLIP image preprocessing for both models, and the shape checks their inputs must pass.

Both models were trained on CLIP's recipe (REFERENCE.md): shortest side to `size`
(bicubic, through PIL on uint8; the long side floored, as transformers computes it), centre crop `size` x `size` (no padding to square),
scale 1/255, CLIP mean/std. EventGPT uses 336 px, Video-LLaVA 224 px; the toy pair
uses its tower's `image_size`. The uint8 half (`resize_and_crop`) is split from the
float half (`normalize`) so training can keep thousands of frames as uint8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evspec.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_and_crop(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, size, size]: shortest side to `size` (bicubic), centre crop."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {images.shape}")
    height, width = images.shape[2:]
    # transformers' get_resize_output_image_size: the long side is floored, int(size * long / short)
    short, long = min(height, width), max(height, width)
    long_resized = max(size, int(size * long / short))
    resized_hw = (size, long_resized) if height <= width else (long_resized, size)
    top, left = (resized_hw[0] - size) // 2, (resized_hw[1] - size) // 2
    out = np.empty((len(images), 3, size, size), dtype=np.uint8)
    for index, image in enumerate(images):
        picture = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
        if picture.size != (resized_hw[1], resized_hw[0]):
            picture = picture.resize((resized_hw[1], resized_hw[0]), Image.Resampling.BICUBIC)
        out[index] = np.asarray(picture)[top : top + size, left : left + size].transpose(2, 0, 1)
    return out


def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> float32, scaled 1/255 and standardised with CLIP's mean/std."""
    pixels = torch.as_tensor(images).float().div_(255)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


def clip_preprocess(images: np.ndarray, size: int) -> torch.Tensor:
    """The whole CLIP recipe: uint8 [N, 3, H, W] -> float32 [N, 3, size, size]."""
    return normalize(resize_and_crop(images, size))


def check_images(images: np.ndarray, expected_count: int, what: str, source: str | Path) -> None:
    """Refuse a clip's image stack [N, 3, H, W] whose count or layout is not what the model takes."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(source, f"{what} must be [N, 3, H, W] RGB, got shape {tuple(images.shape)}")
    if images.shape[0] != expected_count:
        raise InputError(source, f"{what}: the model takes {expected_count} images, got {images.shape[0]}")
    if min(images.shape[2:]) < 1:
        raise InputError(source, f"{what} are empty: shape {tuple(images.shape)}")
