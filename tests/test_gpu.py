"""GPU-only: the CUDA-graph steps equal eager steps, and speculative decoding on them stays lossless."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import VideoLlavaForConditionalGeneration

from evspec.models.configs import tiny_eventgpt_config, tiny_video_llava_config
from evspec.models.eventgpt import EventGPTForCausalLM
from evspec.models.stages import EventGPTStages, VideoLlavaStages
from evspec.spec.decode import Sampler, decode_speculative, decode_target
from evspec.spec.drafters import TokenDrafter
from evspec.spec.fast_llama import FastLlama

pytestmark = pytest.mark.gpu
VOCAB = 60


def _engine(stages, prompt_embeds, max_length=256, compile=False):
    engine = FastLlama(stages.language_model, stages.lm_head, max_length, compile=compile)
    return engine, engine.forward_embeds(prompt_embeds)


@pytest.mark.parametrize("seed, compile", [(0, False), (1, False), (2, True)])
def test_graph_steps_equal_eager_steps_and_speculation_is_lossless_on_cuda(seed, compile):
    torch.manual_seed(seed)
    target_model = VideoLlavaForConditionalGeneration(tiny_video_llava_config(VOCAB + 2, VOCAB + 1, VOCAB)).eval()
    target = VideoLlavaStages(target_model.cuda())
    draft = EventGPTStages(EventGPTForCausalLM(tiny_eventgpt_config(VOCAB)).eval().cuda())
    embeds = torch.randn(1, 40, 32, device="cuda")
    eager = VideoLlavaStages(copy.deepcopy(target_model).cpu())
    cpu_engine, cpu_prefill = _engine(eager, embeds.cpu())
    engine, prefill = _engine(target, embeds, compile=compile)
    torch.testing.assert_close(prefill.logits.cpu(), cpu_prefill.logits, atol=1e-4, rtol=1e-4)
    for token in (5, 9, 3):  # graph replays (captured on first use) against CPU eager steps
        ids = torch.tensor([[token]])
        torch.testing.assert_close(engine.step(ids.cuda()).logits.cpu(), cpu_engine.step(ids).logits,
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
    engine.rewind(40)
    reference = decode_target(engine, prefill.logits, 20, 2, Sampler()).output_ids
    for k in (1, 4):
        engine.rewind(40)
        draft_engine, _ = _engine(draft, torch.randn(1, 12, 32, device="cuda"))
        result = decode_speculative(engine, prefill, TokenDrafter(draft_engine, VOCAB, VOCAB + 2), k, 20, 2, Sampler())
        assert result.output_ids == reference


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_draft_on_a_second_gpu_stays_lossless():
    torch.manual_seed(5)
    target = VideoLlavaStages(VideoLlavaForConditionalGeneration(tiny_video_llava_config(VOCAB + 2, VOCAB + 1, VOCAB))
                              .eval().to("cuda:0"))  # fmt: skip
    draft = EventGPTStages(EventGPTForCausalLM(tiny_eventgpt_config(VOCAB)).eval().to("cuda:1"))
    engine, prefill = _engine(target, torch.randn(1, 40, 32, device="cuda:0"))
    reference = decode_target(engine, prefill.logits, 20, 2, Sampler()).output_ids
    engine.rewind(40)
    draft_engine, _ = _engine(draft, torch.randn(1, 12, 32, device="cuda:1"))
    result = decode_speculative(engine, prefill, TokenDrafter(draft_engine, VOCAB, VOCAB + 2), 3, 20, 2, Sampler())
    assert result.output_ids == reference
