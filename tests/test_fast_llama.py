"""The fast decoder equals transformers' forward: prefill, decode, verify and rewind, in fp32."""

from __future__ import annotations

import pytest
import torch
from transformers import VideoLlavaForConditionalGeneration

from evspec.models.configs import n_video_tokens, tiny_eventgpt_config, tiny_video_llava_config
from evspec.models.eventgpt import EventGPTForCausalLM
from evspec.models.splice import embed_with_visual_tokens
from evspec.models.stages import EventGPTStages, VideoLlavaStages
from evspec.spec.fast_llama import FastLlama

VOCAB = 60


def _pair(seed):
    torch.manual_seed(seed)
    target = VideoLlavaForConditionalGeneration(tiny_video_llava_config(VOCAB + 2, VOCAB + 1, VOCAB)).eval()
    draft = EventGPTForCausalLM(tiny_eventgpt_config(VOCAB)).eval()
    return VideoLlavaStages(target), EventGPTStages(draft)


@pytest.mark.parametrize("which", ["target", "draft"])
def test_fast_llama_equals_the_stage_api_through_prefill_decode_verify_and_rewind(which):
    target, draft = _pair(0)
    stages = target if which == "target" else draft
    torch.manual_seed(1)
    n_images = 8 if which == "target" else 5
    visual = stages.project(stages.encode_vision(torch.randn(n_images, 3, 28, 28)))
    n_visual = visual.shape[0]
    ids = torch.tensor([[1, 4, *[stages.placeholder_id] * n_visual, 9, 11]])
    reference_cache = stages.new_cache()
    reference = stages.prefill(ids, visual, reference_cache)
    fast = FastLlama(stages.language_model, stages.lm_head, max_length=ids.shape[1] + 16)
    embeds = embed_with_visual_tokens(stages.language_model.embed_tokens, ids, stages.placeholder_id, visual)
    out = fast.forward_embeds(embeds)
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.hidden, reference.hidden, rtol=0, atol=1e-5)
    for token in (3, 17, 5):  # decode steps
        step = torch.tensor([[token]])
        torch.testing.assert_close(fast.step(step).logits, stages.decode_step(step, reference_cache).logits,
                                   rtol=0, atol=1e-5)  # fmt: skip
    draft_ids = torch.tensor([[8, 2, 40, 7]])
    verified = fast.step(draft_ids).logits.clone()
    torch.testing.assert_close(verified, stages.verify(draft_ids, reference_cache).logits, rtol=0, atol=1e-5)
    length = ids.shape[1] + 3 + 2  # keep two of the four verified tokens
    fast.rewind(length)
    stages.rollback(reference_cache, length)
    step = torch.tensor([[13]])
    torch.testing.assert_close(fast.step(step).logits, stages.decode_step(step, reference_cache).logits,
                               rtol=0, atol=1e-5)  # fmt: skip


def test_fast_llama_refuses_to_overflow_or_rewind_forward():
    target, _ = _pair(0)
    fast = FastLlama(target.language_model, target.lm_head, max_length=4)
    fast.step(torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="full"):
        fast.step(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="cannot rewind"):
        fast.rewind(5)


def test_fusing_keeps_one_copy_of_the_weights():
    target, _ = _pair(0)
    attention = target.language_model.layers[0].self_attn
    FastLlama(target.language_model, target.lm_head, max_length=8)
    fused = attention.q_proj.weight.data
    assert attention.k_proj.weight.data.data_ptr() == fused.data_ptr() + fused.numel() * fused.element_size()
