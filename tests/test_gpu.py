"""GPU-only: the engines' CUDA graphs equal eager CPU steps, speculation on them stays lossless, and every
stage of the pipeline runs on CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import VideoLlavaForConditionalGeneration

from evspec.models.configs import tiny_eventgpt_config, tiny_video_llava_config
from evspec.models.eventgpt import EventGPTForCausalLM
from evspec.models.stages import EventGPTStages, VideoLlavaStages
from evspec.models.tokenizer import SharedVocabulary
from evspec.speculative.decode import decode_speculative, decode_target
from evspec.speculative.drafters import TokenDrafter
from evspec.engine.llama import LlamaEngine
from evspec.speculative.sampling import Sampler

pytestmark = pytest.mark.gpu
VOCAB = 60
SHARED = SharedVocabulary(torch.ones(VOCAB, dtype=torch.bool), unknown_id=0)


def _engine(stages, prompt_embeds, max_length=512, compile=None, attention=None):
    engine = LlamaEngine(stages.language_model, stages.lm_head, max_length, compile=compile, attention=attention)
    return engine, engine.prefill(prompt_embeds)


@pytest.mark.parametrize("seed, compile, attention", [(0, False, ("fused", "fused")), (1, False, ("matmul", "fused")),
                                                      (2, True, None), (3, True, ("matmul", "matmul"))])  # fmt: skip
def test_graph_steps_equal_eager_steps_and_speculation_is_lossless_on_cuda(seed, compile, attention):
    torch.manual_seed(seed)
    target_model = VideoLlavaForConditionalGeneration(tiny_video_llava_config(VOCAB + 2, VOCAB + 1, VOCAB)).eval()
    target = VideoLlavaStages(target_model.cuda())
    draft = EventGPTStages(EventGPTForCausalLM(tiny_eventgpt_config(VOCAB)).eval().cuda())
    embeds = torch.randn(1, 40, 32, device="cuda")
    eager = VideoLlavaStages(copy.deepcopy(target_model).cpu())
    cpu_engine, cpu_prefill = _engine(eager, embeds.cpu())
    engine, prefill = _engine(target, embeds, compile=compile, attention=attention)
    torch.testing.assert_close(prefill.logits.cpu(), cpu_prefill.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(prefill.hidden.cpu(), cpu_prefill.hidden, atol=1e-4, rtol=1e-4)  # 40 of the graph's 64
    for ids in ([[5]], [[9, 4, 7]], [[3]]):  # graph replays (captured on first use) against CPU eager steps
        ids = torch.tensor(ids)
        torch.testing.assert_close(engine.step(ids.cuda()).logits.cpu(), cpu_engine.step(ids).logits,
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
    for _ in range(230):  # into the next length bucket: a new graph, the same numbers
        ids = torch.tensor([[int(cpu_engine.length) % 50 + 3]])
        gpu, cpu = engine.step(ids.cuda()).logits.cpu(), cpu_engine.step(ids).logits
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)
    assert len(engine.graphs.graphs) == 4  # the prefill padded to 64, (1, 256), (3, 256), (1, 512)
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


def test_tree_sampling_follows_the_target_law_on_cuda_graphs(monkeypatch):
    """The CPU distribution test of tree sampling (recursive rejection over siblings), on CUDA tree graphs."""
    from test_sampling import TREE_CASES, test_tree_sampling_follows_the_target_law_at_every_position

    test_tree_sampling_follows_the_target_law_at_every_position(*TREE_CASES[0], monkeypatch, device="cuda")


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
    from evspec.speculative.run import SpecSettings, speculate
    from evspec.speculative.summary import summarize

    pair = load_pair(tiny_pair_dir / "draft", tiny_pair_dir / "target", tiny_pair_dir / "draft_tokenizer",
                     tiny_pair_dir / "target_tokenizer", DTYPES[dtype], "cuda", draft_device)  # fmt: skip
    torch.manual_seed(0)
    head = DraftHead(HeadConfig(hidden_size=32, event_size=32, n_heads=2, intermediate_size=32, adapter_hidden_size=16))
    settings = SpecSettings(max_new_tokens=8, max_clips=3, split="train", device="cuda", draft_device=draft_device,
                            dtype=dtype,
                            temperature=temperature, top_p=0.9 if temperature else 1.0, lossless_clips=1,
                            lossless_draws=20, lossless_tokens=3, tree_top_k=2, tree_nodes=5,
                            methods=("target", "hf-generate", "hf-assisted", "token", "token-tree", "feature",
                                     "feature-tree", "hybrid", "cascade", "prefill"),
                            draft_lengths={"hf-assisted": [2], "token": [3], "token-tree": [3], "feature": [2],
                                           "feature-tree": [2], "hybrid": [2], "cascade": [3], "prefill": [2]})  # fmt: skip
    frames = speculate(pair, head.to("cuda", DTYPES[dtype]), tiny_data, settings, 0, 1, tmp_path)
    for method in ("target", "hf-generate", "token", "token-tree", "feature", "feature-tree", "hybrid", "cascade",
                   "prefill"):
        assert (frames[method]["status"] == "ok").all(), method
    if temperature == 0.0 and dtype == "float32":  # lossless in fp32: every method's ids are the target's
        for method in ("hf-generate", "token", "token-tree", "feature", "feature-tree", "hybrid", "cascade",
                       "prefill"):
            assert frames[method]["exact_match"].all(), method
    if temperature:
        assert len(frames["lossless"]) > 0
    summary = summarize(tmp_path, tmp_path / "summary.json")
    assert summary["device"].startswith("NVIDIA")


@pytest.mark.parametrize("temperature, draft_device", [
    (0.0, None), pytest.param(0.0, "cuda:1", marks=SECOND_GPU), pytest.param(0.9, "cuda:1", marks=SECOND_GPU)])
def test_edge_cloud_runs_over_a_link_on_cuda(tiny_pair_dir, tiny_data, tmp_path, temperature, draft_device):
    """`token` and `feature` over a 2 ms link, the edge on the target's GPU or on its own: fp32 greedy answers are
    the target's, `token` waits one round trip per cycle and drafts ahead in every one, `feature` sends its event
    tokens up once; sampling runs (its law is the CPU tests')."""
    from evspec.adapter.modules import DraftHead, HeadConfig
    from evspec.models.toy import load_pair
    from evspec.speculative.run import SpecSettings, speculate

    pair = load_pair(tiny_pair_dir / "draft", tiny_pair_dir / "target", tiny_pair_dir / "draft_tokenizer",
                     tiny_pair_dir / "target_tokenizer", device="cuda", draft_device=draft_device)  # fmt: skip
    torch.manual_seed(0)
    head = DraftHead(HeadConfig(hidden_size=32, event_size=32, n_heads=2, intermediate_size=32, adapter_hidden_size=16))
    settings = SpecSettings(max_new_tokens=8, max_clips=3, split="train", device="cuda", draft_device=draft_device,
                            compile=False, temperature=temperature, lossless_draws=0, methods=("target", "token", "feature"),
                            draft_lengths={"token": [3], "feature": [2]}, link_rtt_ms=2.0)  # fmt: skip
    frames = speculate(pair, head.to("cuda"), tiny_data, settings, 0, 1, tmp_path)
    token, feature = frames["token"], frames["feature"]
    assert (token["status"] == "ok").all() and (feature["status"] == "ok").all()
    if not temperature:
        assert token["exact_match"].all() and feature["exact_match"].all()
    cycles = token["target_forwards"] - 1
    assert (token["link_messages_up"] == cycles).all() and (token["ahead_cycles"] == cycles).all()
    assert (token["total_ms"] >= (cycles + 0.5) * 2.0).all() and (feature["link_messages_up"] == 1).all()


def test_stage_timing_runs_on_cuda(tiny_pair_dir, tmp_path):
    from evspec.bench.stages import BenchSettings, bench_stages

    parts = ("draft", "target", "draft_tokenizer", "target_tokenizer")
    frame = bench_stages(BenchSettings(device="cuda", repeats=2, warmup=1, verify_lengths=[2]),
                         {part: tiny_pair_dir / part for part in parts}, tmp_path / "stages.parquet")  # fmt: skip
    assert {"vision", "vision_served", "prefill", "decode_step", "verify", "tree_verify", "draft_head_token"} <= set(frame["stage"])


# ---- the head engine and the prefill overlap on CUDA ------------------------------------------------------


@pytest.mark.parametrize("compile", [False, True])
@torch.no_grad()
def test_head_engine_graphs_equal_the_cpu_engine(compile):
    from test_engine import HIDDEN, VOCAB as HEAD_VOCAB, _head

    from evspec.engine.head import HeadEngine
    from evspec.speculative.sampling import SamplingSpec, inverse_cdf

    for spec in (SamplingSpec(), SamplingSpec(temperature=0.8, top_p=0.9)):
        head, embed, lm_head = _head()
        cpu = HeadEngine(head, embed, lm_head, 7, 300, 4, Sampler(spec, torch.Generator().manual_seed(0)))
        gpu_head, gpu_embed, gpu_lm_head = (copy.deepcopy(m).cuda() for m in (head, embed, lm_head))
        gpu = HeadEngine(gpu_head, gpu_embed, gpu_lm_head, 7, 300, 4,
                         Sampler(spec, torch.Generator("cuda").manual_seed(0)), compile=compile)  # fmt: skip
        events, hidden = torch.randn(7, 24), torch.randn(1, HIDDEN)
        cpu.load_events(events)
        gpu.load_events(events.cuda())
        cpu.start(5, hidden[0])
        gpu.start(5, hidden[0].cuda())
        generator = torch.Generator().manual_seed(1)
        for cycle in range(120):  # several graphs (k = 2, 4; greedy: trees too) and a second length bucket
            k = 2 if cycle % 3 else 4
            if spec.greedy and cycle % 5 == 4:  # an EAGLE-2 tree, its levels one graph per (depth, top-k, bucket)
                (cpu_ids, cpu_parents), (gpu_ids, gpu_parents) = cpu.draft_tree(2, 2, 3), gpu.draft_tree(2, 2, 3)
                assert (gpu_ids.tolist(), gpu_parents) == (cpu_ids.tolist(), cpu_parents), cycle
                k = 2  # the commit below: up to depth + 1 tokens
            else:
                state = gpu.sampler.generator.get_state()
                (cpu_ids, cpu_q), (gpu_ids, gpu_q) = cpu.propose(k), gpu.propose(k)
            if spec.greedy:
                assert gpu_ids.tolist() == cpu_ids.tolist()
            else:  # the first draft's law equals the CPU's; every draft is its law's inverse CDF at the uniforms drawn
                torch.testing.assert_close(gpu_q[0].cpu(), cpu_q[0], atol=1e-4, rtol=1e-4)
                uniforms = torch.rand(k, device="cuda", generator=torch.Generator("cuda").set_state(state))
                assert gpu_ids.tolist() == inverse_cdf(gpu_q, uniforms).tolist()
            m = int(torch.randint(1, k + 2, (1,), generator=generator))
            kept, kept_hidden = torch.randint(3, HEAD_VOCAB, (m,), generator=generator).tolist(), torch.randn(m, HIDDEN)
            cpu.commit(kept, kept_hidden)
            gpu.commit(kept, kept_hidden.cuda())
        trees = sum(key[0] == "tree" for key in gpu.graphs.graphs)
        assert gpu.length > 256 and len(gpu.graphs.graphs) - trees == 4 and (trees >= 2) == spec.greedy


@pytest.mark.parametrize("compile", [False, True])
@torch.no_grad()
def test_bf16_head_engine_runs_the_kernels_and_drafts_as_pytorch_ops_do(compile, monkeypatch):
    """bf16 drafting on CUDA (projections by the matvec kernel, attention by the fused op with its additive
    mask; profiled) against the same engine on PyTorch's ops, both against the fp32 CPU engine: each
    proposal's first law is no further from fp32 than PyTorch's own bf16 rounding puts it."""
    from test_engine import HIDDEN, _head

    from evspec.engine import matvec
    from evspec.engine.head import HeadEngine
    from evspec.speculative.sampling import SamplingSpec

    spec = SamplingSpec(temperature=1.0)
    head, embed, lm_head = _head()
    exact = HeadEngine(head, embed, lm_head, 7, 300, 4, Sampler(spec, torch.Generator().manual_seed(0)))
    engines = []
    for _ in range(2):  # the kernel engine, then the ops engine
        modules = (copy.deepcopy(m).cuda().to(torch.bfloat16) for m in (head, embed, lm_head))
        engines.append(HeadEngine(*modules, 7, 300, 4, Sampler(spec, torch.Generator("cuda").manual_seed(0)),
                                  compile=compile))  # fmt: skip
    events, generator = torch.randn(7, 24), torch.Generator().manual_seed(1)
    exact.load_events(events)
    hidden = torch.randn(1, HIDDEN)
    exact.start(5, hidden[0])
    for engine in engines:
        engine.load_events(events.cuda())
        engine.start(5, hidden[0].cuda())
    errors = []
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]  # ops at capture, kernels
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(90):  # past the first length bucket (about 3 tokens kept per proposal)
            want = exact.propose(4)[1][0]
            kernel_law = engines[0].propose(4)[1][0]
            with monkeypatch.context() as patch:
                patch.setattr(matvec, "AVAILABLE", False)  # linear falls back to PyTorch's ops
                ops_law = engines[1].propose(4)[1][0]
            errors.append([(law.float().cpu() - want).abs().max().item() for law in (kernel_law, ops_law)])
            m = int(torch.randint(1, 6, (1,), generator=generator))
            kept, kept_hidden = torch.randint(3, 60, (m,), generator=generator).tolist(), torch.randn(m, HIDDEN)
            exact.commit(kept, kept_hidden)
            for engine in engines:
                engine.commit(kept, kept_hidden.cuda())
        torch.cuda.synchronize()
    worst_kernel, worst_ops = (max(column) for column in zip(*errors))
    assert worst_kernel <= 2 * worst_ops + 5e-3, (worst_kernel, worst_ops)
    names = {event.name for event in profiler.events()}
    assert any("_matvec_kernel" in name for name in names) and "evspec::fused_attention" in names
    assert engines[0].length > 256


def _engines_and_clip(tiny_pair_dir, tiny_data, draft_device=None):
    import pandas as pd

    from evspec.h5 import open_h5
    from evspec.models.toy import load_pair
    from evspec.speculative.methods import Engines
    from evspec.speculative.run import SpecSettings, _load_clip

    pair = load_pair(tiny_pair_dir / "draft", tiny_pair_dir / "target", tiny_pair_dir / "draft_tokenizer",
                     tiny_pair_dir / "target_tokenizer", device="cuda", draft_device=draft_device)  # fmt: skip
    settings = SpecSettings(methods=("target", "prefill"), draft_lengths={"prefill": [2]}, device="cuda",
                            draft_device=draft_device, max_new_tokens=8)  # fmt: skip
    row = next(pd.read_parquet(tiny_data / "manifest.parquet").itertuples())
    with open_h5(tiny_data / "tensors.h5") as handle:
        clip = _load_clip(row, handle["frames"], handle["event_images"], pair, settings, tiny_data)
    vocabulary = SharedVocabulary.from_tokenizers(pair.draft_tokenizer, pair.target_tokenizer,
                                                  pair.draft.lm_head.out_features, pair.target.lm_head.out_features)  # fmt: skip
    engines = Engines(pair, None, vocabulary, pair.target_tokenizer.eos_token_id, settings,
                      (clip.target_ids.shape[1], clip.draft_ids.shape[1]))  # fmt: skip
    return engines, clip


@pytest.mark.parametrize("draft_device", [None, pytest.param("cuda:1", marks=SECOND_GPU)])
def test_prefill_drafting_overlaps_the_targets_vision_without_host_syncs(tiny_pair_dir, tiny_data, draft_device,
                                                                          monkeypatch):  # fmt: skip
    """Both visions are made slow (spin kernels first on their streams: ~0.3 s for the target, ~0.1 s for the
    draft): the host must queue the whole overlapped prefill without waiting for either model, and the
    draft's prefill and drafts must finish during the target's vision, on a side stream (one GPU) or the
    draft's GPU (two). A host wait on the draft's stream (a blocking copy there) queues the target's
    prefill only after the draft's spin."""
    import time

    engines, clip = _engines_and_clip(tiny_pair_dir, tiny_data, draft_device)
    engines.run("prefill", clip, 2)  # warm-up: graph capture and allocation synchronise; the hot path must not
    cycles_per_second = 2e9  # about an H100's or H200's SM clock

    def spun(visual_tokens, device, seconds):
        def slow_vision(pixels):
            with torch.cuda.device(device):  # on that GPU's current stream (the side stream inside the overlap)
                torch.cuda._sleep(int(seconds * cycles_per_second))
            return visual_tokens(pixels)

        return slow_vision

    monkeypatch.setattr(engines.target, "visual_tokens", spun(engines.target.visual_tokens, engines.device, 0.3))
    monkeypatch.setattr(engines.draft, "visual_tokens", spun(engines.draft.visual_tokens, engines.draft_device, 0.1))
    draft_queue = engines.side_stream or torch.cuda.current_stream(engines.draft_device)
    torch.cuda.synchronize()
    started = time.perf_counter()
    prefill, drafter = engines.overlapped_prefill(clip, 2)
    host_ms = (time.perf_counter() - started) * 1000
    draft_queue.synchronize()
    draft_ms = (time.perf_counter() - started) * 1000
    torch.cuda.synchronize(engines.device)
    total_ms = (time.perf_counter() - started) * 1000
    assert total_ms > 200, "the spin kernel did not slow the target's vision"
    assert host_ms < total_ms / 4, f"the host waited: queued in {host_ms:.0f} of {total_ms:.0f} ms"
    assert draft_ms < total_ms * 0.6, f"the draft waited for the target's vision: done at {draft_ms:.0f} of {total_ms:.0f} ms"
    answer = engines.speculative(prefill, drafter, 2, 8).output_ids
    assert answer == engines.run("target", clip, 0).decoded.output_ids


@pytest.mark.parametrize("device", ["cuda:0", pytest.param("cuda:1", marks=SECOND_GPU)])
def test_graphs_on_any_gpu_equal_cpu_steps_and_vision(device):
    """Engine steps and the vision towers' graphs, captured on the model's own GPU (a second one for a
    draft on `draft_device`), compute what eager CPU code does: an empty graph would replay nothing."""
    torch.manual_seed(7)
    model = VideoLlavaForConditionalGeneration(tiny_video_llava_config(VOCAB + 2, VOCAB + 1, VOCAB)).eval()
    cpu = VideoLlavaStages(copy.deepcopy(model))
    gpu = VideoLlavaStages(model.to(device))
    embeds = torch.randn(1, 40, 32)
    cpu_engine, cpu_prefill = _engine(cpu, embeds)
    engine, _ = _engine(gpu, embeds.to(device))
    prefill = engine.prefill(embeds.to(device))  # the prefill's graph replayed
    torch.testing.assert_close(prefill.hidden.cpu(), cpu_prefill.hidden, atol=1e-4, rtol=1e-4)
    for ids in ([[5]], [[9, 4, 7]], [[3]], [[8]]):
        ids = torch.tensor(ids)
        torch.testing.assert_close(engine.step(ids.to(device)).logits.cpu(), cpu_engine.step(ids).logits,
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
    for _ in range(2):  # the second call replays the graph captured by the first
        pixels = torch.randn(8, 3, 28, 28)
        torch.testing.assert_close(gpu.visual_tokens(pixels.to(device)).cpu(), cpu.visual_tokens(pixels),
                                   atol=1e-4, rtol=1e-4)  # fmt: skip


@pytest.mark.parametrize("compile", [False, True])
def test_tree_steps_on_graphs_equal_cpu_tree_steps(compile):
    """Tree verifies replayed as graphs (the tree's shape is a static input, so one graph serves every tree of
    n tokens) and `keep` give the CPU engine's logits."""
    torch.manual_seed(3)
    model = VideoLlavaForConditionalGeneration(tiny_video_llava_config(VOCAB + 2, VOCAB + 1, VOCAB)).eval()
    cpu = VideoLlavaStages(copy.deepcopy(model))
    gpu = VideoLlavaStages(model.cuda())
    embeds = torch.randn(1, 40, 32)
    cpu_engine, _ = _engine(cpu, embeds)
    engine = LlamaEngine(gpu.language_model, gpu.lm_head, 512, compile=compile)
    engine.prefill(embeds.cuda())
    for parents, path in (([-1, 0, 0, 1, 2], [0, 2, 4]), ([-1, -1, 0, 2, 1], [1, 4]), ([-1, 0, 1, 2, 3], [0, 1])):
        ids = torch.randint(3, VOCAB, (1, 5))  # three trees of 5 tokens: one graph
        want, got = cpu_engine.step_tree(ids, parents).logits, engine.step_tree(ids.cuda(), parents).logits.cpu()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        cpu_engine.keep(path)
        engine.keep(path)
    torch.testing.assert_close(engine.step(torch.tensor([[6]], device="cuda")).logits.cpu(),
                               cpu_engine.step(torch.tensor([[6]])).logits, atol=1e-4, rtol=1e-4)  # fmt: skip
    assert sum(key[0] == "tree" for key in engine.graphs.graphs) == 1


# ---- the projection kernel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17, 32])
@pytest.mark.parametrize("silu_pairs, with_residual", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matvec_kernel_computes_what_pytorch_ops_do(rows, silu_pairs, with_residual, dtype):
    """Every output feature and row, with shapes that leave partial tiles (features and columns not
    multiples of any tile): within twice PyTorch's own rounding error of the fp32 result."""
    from evspec.engine import matvec

    torch.manual_seed(rows)
    n, k = 100, 600
    x = torch.randn(rows, 2 * k if silu_pairs else k, device="cuda", dtype=dtype)
    weight = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
    residual = torch.randn(rows, n, device="cuda", dtype=dtype) if with_residual else None
    exact = matvec.reference(x.double(), weight.double(), None if residual is None else residual.double(), silu_pairs)
    pytorch_error = (matvec.reference(x, weight, residual, silu_pairs).double() - exact).abs().max()
    kernel = matvec.linear(x[None], weight, None if residual is None else residual[None], silu_pairs)[0]
    assert kernel.dtype == dtype and kernel.shape == (rows, n)
    torch.testing.assert_close(kernel.double(), exact, atol=2 * float(pytorch_error) + 1e-3, rtol=0)


def test_matvec_linear_trains_through_pytorch_ops():
    """A batch-1 bf16 projection that needs gradients (the draft head's training at small batches) takes
    PyTorch's ops, which have a backward; without gradients the same call runs the kernel."""
    from evspec.engine import matvec

    x = torch.randn(1, 3, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(48, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    matvec.linear(x, weight, residual=torch.ones(1, 3, 48, device="cuda", dtype=torch.bfloat16)).sum().backward()
    torch.testing.assert_close(weight.grad, x.detach()[0].sum(0).expand(48, -1), rtol=1e-2, atol=1e-2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler, torch.no_grad():
        matvec.linear(x, weight)
        torch.cuda.synchronize()
    assert any("_matvec_kernel" in event.name for event in profiler.events())


@pytest.mark.parametrize("compile", [False, True])
@torch.no_grad()
def test_bf16_engine_steps_run_the_kernel_and_match_pytorch_ops(compile):
    """The engine's bf16 steps and verifies (profiled: the kernel runs) against the same engine on PyTorch's
    ops, both against the fp32 engine: the kernel's error is no larger than cuBLAS's."""
    torch.manual_seed(11)
    model = VideoLlavaForConditionalGeneration(tiny_video_llava_config(VOCAB + 2, VOCAB + 1, VOCAB)).eval().cuda()
    exact = VideoLlavaStages(copy.deepcopy(model))
    stages = VideoLlavaStages(model.to(torch.bfloat16))
    embeds = torch.randn(1, 40, 32, device="cuda")
    reference, _ = _engine(exact, embeds)
    kernel_engine = LlamaEngine(stages.language_model, stages.lm_head, 512, compile=compile)
    ops_engine = LlamaEngine(stages.language_model, stages.lm_head, 512, compile=compile, matvec_kernel=False)
    for engine in (kernel_engine, ops_engine):
        engine.prefill(embeds.to(torch.bfloat16))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for ids in ([[5]], [[9, 4, 7]], [[3]], [[8, 2, 6, 1, 4, 4, 9, 30, 12]]):
            ids = torch.tensor(ids, device="cuda")
            want = reference.step(ids).logits
            errors = [(engine.step(ids).logits.float() - want).abs().max() for engine in (kernel_engine, ops_engine)]
            assert errors[0] <= 2 * errors[1] + 2e-2, errors
        torch.cuda.synchronize()
    assert any("_matvec_kernel" in event.name for event in profiler.events())
