"""GPU-only: the CUDA-graph steps equal eager steps, and speculative decoding on them stays lossless."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import VideoLlavaForConditionalGeneration

from evspec.models.configs import tiny_eventgpt_config, tiny_video_llava_config
from evspec.models.eventgpt import EventGPTForCausalLM
from evspec.models.stages import EventGPTStages, VideoLlavaStages
from evspec.models.tokenizer import SharedVocabulary
from evspec.spec.decode import decode_speculative, decode_target
from evspec.spec.drafters import TokenDrafter
from evspec.spec.fast_llama import FastLlama
from evspec.spec.sampling import Sampler

pytestmark = pytest.mark.gpu
VOCAB = 60
SHARED = SharedVocabulary(torch.ones(VOCAB, dtype=torch.bool), unknown_id=0)


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
        result = decode_speculative(engine, prefill, TokenDrafter(draft_engine, SHARED, VOCAB + 2, Sampler()), k, 20, 2, Sampler())
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
    result = decode_speculative(engine, prefill, TokenDrafter(draft_engine, SHARED, VOCAB + 2, Sampler()), 3, 20, 2, Sampler())
    assert result.output_ids == reference


def test_speculative_sampling_follows_the_target_law_on_cuda_graphs(monkeypatch):
    """The CPU distribution test of tests/test_sampling.py, on CUDA graphs and CUDA random streams."""
    from test_sampling import CASES, test_speculative_sampling_follows_the_target_law_at_every_position

    kind, k, spec = CASES[0]
    test_speculative_sampling_follows_the_target_law_at_every_position(kind, k, spec, monkeypatch, device="cuda")


# ---- every model stage of the pipeline on CUDA (the configuration `models.device: cuda` runs) ------------


def test_toy_training_runs_on_cuda(tiny_data, tmp_path):
    from conftest import TINY_TOY

    from evspec.models.toy import ToyShape
    from evspec.train.toy import ToySettings, train_toy

    settings = ToySettings(shape=ToyShape(**TINY_TOY), steps=3, batch_size=4, warmup_steps=1, device="cuda")
    metrics = train_toy(tiny_data / "manifest.parquet", tiny_data / "tensors.h5", tmp_path / "toy", tmp_path / "m.json",
                        settings)  # fmt: skip
    assert (tmp_path / "toy" / "target" / "config.json").is_file() and metrics


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_feature_extraction_and_adapter_training_run_on_cuda(tiny_pair_dir, tiny_data, tmp_path, dtype):
    from evspec.adapter.train import AdapterSettings, train_adapter
    from evspec.features.extract import FeatureSettings, extract_features
    from evspec.features.store import FeatureReader

    settings = FeatureSettings(max_new_tokens=5, batch_clips=3, device="cuda", dtype=dtype)
    extract_features("video_llava", tiny_pair_dir / "target", tiny_pair_dir / "target_tokenizer", tiny_data,
                     tmp_path / "video_llava.h5", settings)  # fmt: skip
    extract_features("eventgpt", tiny_pair_dir / "draft", tiny_pair_dir / "draft_tokenizer", tiny_data,
                     tmp_path / "eventgpt.h5", settings, tmp_path / "video_llava.h5", tiny_pair_dir / "target_tokenizer")  # fmt: skip
    if dtype == "float32":  # the CPU cache of the same pair holds the same answers and states
        cpu = tmp_path / "cpu.h5"
        extract_features("video_llava", tiny_pair_dir / "target", tiny_pair_dir / "target_tokenizer", tiny_data, cpu,
                         FeatureSettings(max_new_tokens=5, batch_clips=3))  # fmt: skip
        ids = list(__import__("pandas").read_parquet(tiny_data / "manifest.parquet")["sample_id"])
        for gpu_record, cpu_record in zip(FeatureReader(tmp_path / "video_llava.h5").records(ids, ("answer_ids", "hidden")),
                                          FeatureReader(cpu).records(ids, ("answer_ids", "hidden"))):  # fmt: skip
            assert gpu_record["answer_ids"].tolist() == cpu_record["answer_ids"].tolist()
            torch.testing.assert_close(torch.as_tensor(gpu_record["hidden"]), torch.as_tensor(cpu_record["hidden"]),
                                       atol=1e-3, rtol=1e-3)  # fmt: skip
    metrics = train_adapter(tmp_path, tiny_data, tiny_pair_dir / "target", tiny_pair_dir / "draft", settings,
                            AdapterSettings(adapter_steps=5, head_steps=5, unroll_steps=1, batch_size=4, device="cuda"),
                            tmp_path / "adapter")  # fmt: skip
    assert {"linear", "adapter", "head", "head-text-only"} <= set(metrics["rows"])


SECOND_GPU = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


@pytest.mark.parametrize("dtype, temperature, draft_device", [
    ("float32", 0.0, None), ("bfloat16", 0.0, None), ("float32", 0.9, None),
    pytest.param("float32", 0.0, "cuda:1", marks=SECOND_GPU), pytest.param("float32", 0.9, "cuda:1", marks=SECOND_GPU)])
def test_speculate_runs_every_method_on_cuda(tiny_pair_dir, tiny_data, tmp_path, dtype, temperature, draft_device):
    from evspec.adapter.modules import DraftHead, HeadConfig
    from evspec.models.checkpoint import DTYPES
    from evspec.models.toy import load_pair
    from evspec.spec.run import SpecSettings, speculate
    from evspec.spec.summary import summarize

    pair = load_pair(tiny_pair_dir / "draft", tiny_pair_dir / "target", tiny_pair_dir / "draft_tokenizer",
                     tiny_pair_dir / "target_tokenizer", DTYPES[dtype], "cuda", draft_device)  # fmt: skip
    torch.manual_seed(0)
    head = DraftHead(HeadConfig(hidden_size=32, event_size=32, n_heads=2, intermediate_size=32, adapter_hidden_size=16))
    settings = SpecSettings(max_new_tokens=8, max_clips=3, split="train", device="cuda", draft_device=draft_device,
                            dtype=dtype,
                            temperature=temperature, top_p=0.9 if temperature else 1.0, lossless_clips=1,
                            lossless_draws=20, lossless_tokens=3,
                            draft_lengths={"hf-assisted": [2], "token": [3], "feature": [2], "prefill": [2]})  # fmt: skip
    frames = speculate(pair, head.to("cuda", DTYPES[dtype]), tiny_data, settings, 0, 1, tmp_path)
    for method in ("target", "hf-generate", "token", "feature", "prefill"):
        assert (frames[method]["status"] == "ok").all(), method
    if temperature == 0.0 and dtype == "float32":  # lossless in fp32: every method's ids are the target's
        for method in ("hf-generate", "token", "feature", "prefill"):
            assert frames[method]["exact_match"].all(), method
    if temperature:
        assert len(frames["lossless"]) > 0
    summary = summarize(tmp_path, tmp_path / "summary.json")
    assert summary["device"].startswith("NVIDIA")


def test_stage_timing_runs_on_cuda(tiny_pair_dir, tmp_path):
    from evspec.bench.stages import BenchSettings, bench_stages

    parts = ("draft", "target", "draft_tokenizer", "target_tokenizer")
    frame = bench_stages(BenchSettings(device="cuda", repeats=2, warmup=1, verify_lengths=[2]),
                         {part: tiny_pair_dir / part for part in parts}, tmp_path / "stages.parquet")  # fmt: skip
    assert {"vision", "prefill", "decode_step_fast_engine", "verify", "draft_head_step"} <= set(frame["stage"])
