"""CLIP preprocessing: shortest side to size (bicubic on uint8), centre crop, CLIP mean/std."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from evspec.errors import InputError
from evspec.models.processing import CLIP_MEAN, check_images, clip_preprocess, normalize, resize_and_crop


def test_shortest_side_is_resized_bicubic_then_centre_cropped():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 48, 64), dtype=np.uint8)  # landscape: width is cropped
    out = resize_and_crop(image[None], 24)
    reference = np.asarray(Image.fromarray(image.transpose(1, 2, 0)).resize((32, 24), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out[0], reference[:, 4:28].transpose(2, 0, 1))
    tall = resize_and_crop(image.transpose(0, 2, 1)[None].copy(), 24)  # portrait: height is cropped
    assert tall.shape == (1, 3, 24, 24)


def test_an_image_already_at_size_is_left_as_is():
    image = np.random.default_rng(1).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    np.testing.assert_array_equal(resize_and_crop(image, 32), image)


def test_normalize_maps_the_clip_mean_to_zero():
    mean_pixel = np.round(np.array(CLIP_MEAN) * 255).astype(np.uint8)
    image = np.broadcast_to(mean_pixel[:, None, None], (1, 3, 4, 4)).copy()
    assert normalize(image).abs().max() < 0.01
    assert clip_preprocess(image, 2).dtype == torch.float32


def test_wrong_image_count_or_layout_is_named():
    with pytest.raises(InputError, match="frames: the model takes 8 images, got 7"):
        check_images(np.zeros((7, 3, 4, 4), np.uint8), 8, "frames", "tensors.h5")
    with pytest.raises(InputError, match="must be \\[N, 3, H, W\\] RGB"):
        check_images(np.zeros((8, 4, 4, 3), np.uint8), 8, "frames", "tensors.h5")


def _pil_clip_processor(size: int):
    """transformers' PIL-backed CLIP processor (the reference the real models were trained with)."""
    try:  # transformers >= 5.2x names the PIL backend; older 5.x has only the PIL one
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@pytest.mark.parametrize("height, width", [(1080, 1440), (480, 601), (601, 480), (37, 91), (64, 64)])
def test_preprocessing_equals_transformers_processors(height, width):
    """EventGPT: CLIPImageProcessor at 336; Video-LLaVA: VideoLlavaImageProcessor at 224 (odd sizes included:
    1440x1080 floors its long side to 298 at 224 px, 480x601 to 420 at 336 px)."""
    from transformers import VideoLlavaImageProcessor

    images = np.random.default_rng(height * width).integers(0, 256, (2, 3, height, width), dtype=np.uint8)
    channels_last = [image.transpose(1, 2, 0) for image in images]
    for size, processor in ((336, _pil_clip_processor(336)), (224, VideoLlavaImageProcessor())):
        reference = next(iter(processor(channels_last, return_tensors="pt").values()))
        torch.testing.assert_close(clip_preprocess(images, size), reference.reshape(2, 3, size, size), atol=1e-6, rtol=0)
