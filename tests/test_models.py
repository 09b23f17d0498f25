"""Both models behind the stage API and the engine: decoupled stages equal the monolithic model, token for token."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import VideoLlavaForConditionalGeneration

from evspec.errors import InputError
from evspec.models.checkpoint import load_eventgpt, load_video_llava
from evspec.models.configs import (
    eventgpt_7b_config,
    n_video_tokens,
    tiny_eventgpt_config,
    tiny_video_llava_config,
    video_llava_7b_config,
)
from evspec.models.eventgpt import EventGPTForCausalLM
from evspec.models.stages import EventGPTStages, VideoLlavaStages

VOCAB = 60
VIDEO_ID, IMAGE_ID = VOCAB + 1, VOCAB  # target vocabulary = shared + its special tokens


@pytest.fixture(scope="module")
def eventgpt():
    torch.manual_seed(0)
    return EventGPTForCausalLM(tiny_eventgpt_config(VOCAB)).eval()


@pytest.fixture(scope="module")
def video_llava():
    torch.manual_seed(1)
    return VideoLlavaForConditionalGeneration(tiny_video_llava_config(VOCAB + 2, VIDEO_ID, IMAGE_ID)).eval()


def _event_prompt(model, prefix=(1, 5, 9), suffix=(7, 8, 3)):
    n = model.config.n_visual_tokens
    return torch.tensor([[*prefix, *[model.config.event_placeholder_id] * n, *suffix]])


def _video_prompt(model, prefix=(1, 4), suffix=(11, 12)):
    return torch.tensor([[*prefix, *[VIDEO_ID] * n_video_tokens(model.config), *suffix]])


def test_real_shapes_give_the_reference_token_counts():
    assert eventgpt_7b_config().n_visual_tokens == 582  # T=5 temporal + 577 spatial
    assert n_video_tokens(video_llava_7b_config()) == 2056  # 8 frames x 257


def test_eventgpt_pooling_is_temporal_then_spatial(eventgpt):
    stages = EventGPTStages(eventgpt)
    pixels = torch.randn(5, 3, 28, 28)
    vision = stages.encode_vision(pixels)
    assert vision.shape == (5, 5, 32)  # 4 patches + CLS per image
    tokens = stages.project(vision)
    projected = eventgpt.model.feature_adaptor(eventgpt.model.visual_projector(vision))
    torch.testing.assert_close(tokens[:5], projected.mean(dim=1))
    torch.testing.assert_close(tokens[5:], projected.mean(dim=0))
    assert tokens.shape == (eventgpt.config.n_visual_tokens, 32)


@pytest.mark.parametrize("seed", range(4))
def test_eventgpt_stages_equal_monolithic_forward_and_generate(eventgpt, seed):
    torch.manual_seed(seed)
    stages = EventGPTStages(eventgpt)
    pixels = torch.randn(5, 3, 28, 28)
    ids = _event_prompt(eventgpt, prefix=tuple(torch.randint(0, VOCAB, (3,)).tolist()))
    with torch.no_grad():
        reference = eventgpt(input_ids=ids, event_pixel_values=pixels).logits
    step = stages.engine(ids.shape[1]).prefill(stages.embed(ids, stages.project(stages.encode_vision(pixels))))
    torch.testing.assert_close(step.logits, reference[:, -1:], rtol=0, atol=1e-5)
    generated = eventgpt.generate(input_ids=ids, event_pixel_values=pixels, max_new_tokens=12, do_sample=False,
                                  pad_token_id=0)  # fmt: skip
    eos = eventgpt.generation_config.eos_token_id
    assert stages.generate(ids, pixels, max_new_tokens=12, eos_token_id=eos) == generated[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("seed", range(4))
def test_video_llava_stages_equal_monolithic_forward_and_generate(video_llava, seed):
    torch.manual_seed(seed)
    stages = VideoLlavaStages(video_llava)
    frames = torch.randn(1, 8, 3, 28, 28)
    ids = _video_prompt(video_llava, prefix=tuple(torch.randint(0, VOCAB, (2,)).tolist()))
    with torch.no_grad():
        reference = video_llava(input_ids=ids, pixel_values_videos=frames).logits
    step = stages.engine(ids.shape[1]).prefill(stages.embed(ids, stages.project(stages.encode_vision(frames[0]))))
    torch.testing.assert_close(step.logits, reference[:, -1:], rtol=0, atol=1e-5)
    generated = video_llava.generate(input_ids=ids, pixel_values_videos=frames, max_new_tokens=12, do_sample=False,
                                     pad_token_id=0)  # fmt: skip
    eos = video_llava.generation_config.eos_token_id
    assert stages.generate(ids, frames[0], max_new_tokens=12, eos_token_id=eos) == generated[0, ids.shape[1]:].tolist()


def test_placeholder_count_must_match_visual_tokens(eventgpt):
    stages = EventGPTStages(eventgpt)
    visual = stages.project(stages.encode_vision(torch.randn(5, 3, 28, 28)))
    with pytest.raises(ValueError, match="placeholders but 9 visual tokens"):
        stages.embed(_event_prompt(eventgpt), visual[:9])


def test_checkpoint_roundtrip_and_mismatches_named(eventgpt, tmp_path):
    eventgpt.save_pretrained(tmp_path)
    loaded = load_eventgpt(tmp_path)
    for name, tensor in eventgpt.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("model.feature_adaptor.weight")
    weights["model.visual_projector.5.weight"] = torch.zeros(2)
    weights["lm_head.weight"] = torch.zeros(VOCAB + 1, 32)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError) as error:
        load_eventgpt(tmp_path)
    message = str(error.value)
    assert "missing keys: model.feature_adaptor.weight" in message
    assert "unexpected keys: model.visual_projector.5.weight" in message
    assert "mismatched keys: lm_head.weight" in message


def test_checkpoint_of_the_wrong_model_is_refused(video_llava, tmp_path):
    video_llava.save_pretrained(tmp_path)
    assert isinstance(load_video_llava(tmp_path), VideoLlavaForConditionalGeneration)
    with pytest.raises(InputError, match="model_type is 'video_llava', expected 'EventChat_llama'"):
        load_eventgpt(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(InputError, match="config.json: not valid JSON"):
        load_video_llava(tmp_path)
