"""The engines equal their references in fp32: the LLaMA engine equals transformers' forward through
prefill, steps, verifies and rewinds (both attention kernels, across length buckets, at any capacity),
and the head engine's proposals equal the draft head's own training forward."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import VideoLlavaForConditionalGeneration

from evspec.adapter.modules import DraftHead, HeadConfig
from evspec.engine.head import HeadEngine
from evspec.engine.kernels import ATTENTION, BUCKET, additive_mask, attend
from evspec.engine.llama import LlamaEngine
from evspec.models.configs import tiny_eventgpt_config, tiny_video_llava_config
from evspec.models.eventgpt import EventGPTForCausalLM
from evspec.models.stages import EventGPTStages, VideoLlavaStages
from evspec.speculative.sampling import Sampler, SamplingSpec, inverse_cdf

VOCAB = 60


def _stages(which: str, seed: int = 0):
    torch.manual_seed(seed)
    if which == "target":
        return VideoLlavaStages(VideoLlavaForConditionalGeneration(tiny_video_llava_config(VOCAB + 2, VOCAB + 1, VOCAB)).eval())
    return EventGPTStages(EventGPTForCausalLM(tiny_eventgpt_config(VOCAB)).eval())


def _oracle(stages, embeds: torch.Tensor):
    """transformers' own forward over the whole sequence: logits and final hidden states."""
    with torch.no_grad():
        hidden = stages.language_model(inputs_embeds=embeds).last_hidden_state
    return stages.lm_head(hidden), hidden


def _prompt(stages, n_text: int = 4, seed: int = 1):
    torch.manual_seed(seed)
    n_images = 8 if isinstance(stages, VideoLlavaStages) else 5
    visual = stages.project(stages.encode_vision(torch.randn(n_images, 3, 28, 28)))
    text = torch.randint(3, VOCAB, (n_text,)).tolist()
    return torch.tensor([[1, *[stages.placeholder_id] * visual.shape[0], *text]]), visual


# prefills padded to a multiple of the bucket (as on CUDA) or not: the padding must not reach the prompt's positions
@pytest.mark.parametrize("attention, prefill_bucket", [(("fused", "fused"), 0), (("matmul", "matmul"), 7),
                                                       (("fused", "matmul"), 64)])  # fmt: skip
@pytest.mark.parametrize("which", ["target", "draft"])
def test_engine_equals_transformers_through_prefill_steps_verify_and_rewind(which, attention, prefill_bucket):
    stages = _stages(which)
    ids, visual = _prompt(stages)
    embeds = stages.embed(ids, visual)
    engine = LlamaEngine(stages.language_model, stages.lm_head, max_length=ids.shape[1] + 2 * BUCKET,
                         attention=attention, prefill_bucket=prefill_bucket)  # fmt: skip
    assert prefill_bucket <= 1 or embeds.shape[1] % prefill_bucket, "the prompt must need padding"
    out = engine.prefill(embeds)
    logits, hidden = _oracle(stages, embeds)
    torch.testing.assert_close(out.logits, logits[:, -1:], rtol=0, atol=1e-5)  # the prefill's: the last position's
    torch.testing.assert_close(out.hidden, hidden, rtol=0, atol=1e-5)
    sequence = ids[0].tolist()
    generator = torch.Generator().manual_seed(2)
    # steps of 1, verifies of several, rewinds, and enough of them to cross a length bucket
    while len(sequence) < ids.shape[1] + BUCKET + 20:
        n = int(torch.randint(1, 6, (1,), generator=generator))
        tokens = torch.randint(3, VOCAB, (1, n), generator=generator)
        out = engine.step(tokens)
        sequence += tokens[0].tolist()
        full_logits, full_hidden = _oracle(stages, stages.embed(torch.tensor([sequence]), visual))
        torch.testing.assert_close(out.logits, full_logits[:, -n:], rtol=0, atol=1e-5)
        torch.testing.assert_close(out.hidden, full_hidden[:, -n:], rtol=0, atol=1e-5)
        keep = int(torch.randint(0, n, (1,), generator=generator))  # rejected drafts: keep some of the n
        engine.rewind(engine.length - n + keep + 1)
        sequence = sequence[: len(sequence) - n + keep + 1]
    assert engine.length == len(sequence)


def _path(parents: list[int], node: int) -> list[int]:
    """The tree's token indices from the root down to `node`."""
    path = []
    while node >= 0:
        path.insert(0, node)
        node = parents[node]
    return path


@pytest.mark.parametrize("attention", [("fused", "fused"), ("matmul", "matmul")])
def test_tree_step_gives_each_token_its_paths_logits_and_keep_commits_the_path(attention):
    """Every token of a tree verified in one forward has the logits transformers gives the chain cache + its
    path; after `keep`, the cache is the chain cache + the kept path, across a second tree and a bucket edge."""
    stages = _stages("target")
    ids, visual = _prompt(stages)
    engine = LlamaEngine(stages.language_model, stages.lm_head, max_length=ids.shape[1] + BUCKET + 40, attention=attention)
    engine.prefill(stages.embed(ids, visual))
    sequence = ids[0].tolist()
    generator = torch.Generator().manual_seed(4)
    trees = [[-1, 0, 0, 1, 1, 2, 3, 3, -1, 8], [-1, -1, 0, 1, 2, 2, 4, 6, 3]]
    filler = torch.randint(3, VOCAB, (1, BUCKET - ids.shape[1] - 4), generator=generator)
    engine.step(filler)  # the first tree then crosses a length bucket's edge
    sequence += filler[0].tolist()
    for parents in trees:
        tokens = torch.randint(3, VOCAB, (1, len(parents)), generator=generator)
        out = engine.step_tree(tokens, parents)
        for node in range(len(parents)):
            path = [int(tokens[0, i]) for i in _path(parents, node)]
            logits, hidden = _oracle(stages, stages.embed(torch.tensor([sequence + path]), visual))
            torch.testing.assert_close(out.logits[0, node], logits[0, -1], rtol=0, atol=1e-5)
            torch.testing.assert_close(out.hidden[0, node], hidden[0, -1], rtol=0, atol=1e-5)
        kept = _path(parents, len(parents) - 2)  # a path that skips siblings
        engine.keep(kept)
        sequence += [int(tokens[0, i]) for i in kept]
        assert engine.length == len(sequence)
        after = engine.step(torch.tensor([[7]]))
        logits, _ = _oracle(stages, stages.embed(torch.tensor([sequence + [7]]), visual))
        torch.testing.assert_close(after.logits[0, -1], logits[0, -1], rtol=0, atol=1e-5)
        sequence.append(7)


def test_a_tree_grown_level_by_level_gives_what_one_tree_step_gives():
    """A drafter's tree, expanded in three tree steps (`grow`), gives each token its path's logits, and keep
    commits a path through all three levels."""
    stages = _stages("draft")
    ids, visual = _prompt(stages)
    engine = LlamaEngine(stages.language_model, stages.lm_head, max_length=ids.shape[1] + 40)
    engine.prefill(stages.embed(ids, visual))
    sequence = ids[0].tolist()
    levels = [([11, 12, 13], [-1, -1, -1]), ([21, 22, 23], [0, 2, 2]), ([31, 32], [4, 3])]
    tokens, parents = [], []
    for level, (level_tokens, level_parents) in enumerate(levels):
        out = engine.step_tree(torch.tensor([level_tokens]), level_parents, grow=level > 0)
        tokens += level_tokens
        parents += level_parents
        for i in range(len(level_tokens)):
            path = [tokens[j] for j in _path(parents, len(tokens) - len(level_tokens) + i)]
            logits, _ = _oracle(stages, stages.embed(torch.tensor([sequence + path]), visual))
            torch.testing.assert_close(out.logits[0, i], logits[0, -1], rtol=0, atol=1e-5)
    engine.keep([2, 4, 6])  # 13 -> 22 -> 31
    after = engine.step(torch.tensor([[7]]))
    logits, _ = _oracle(stages, stages.embed(torch.tensor([sequence + [13, 22, 31, 7]]), visual))
    torch.testing.assert_close(after.logits[0, -1], logits[0, -1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="grow extends"):
        engine.step_tree(torch.tensor([[5]]), [-1], grow=True)  # a chain step came last


def test_tree_step_refuses_parents_that_are_not_a_tree():
    stages = _stages("target")
    engine = LlamaEngine(stages.language_model, stages.lm_head, max_length=64)
    engine.prefill(torch.randn(1, 5, stages.lm_head.in_features))
    with pytest.raises(ValueError, match="parents"):
        engine.step_tree(torch.tensor([[4, 5, 6]]), [-1, 2, 0])  # a child before its parent
    with pytest.raises(ValueError, match="follows a tree step"):
        engine.keep([0])  # no tree was stepped
    engine.step_tree(torch.tensor([[4, 5, 6, 7]]), [-1, 0, 0, -1])
    with pytest.raises(ValueError, match="not a path"):
        engine.keep([0, 1, 2])  # siblings
    with pytest.raises(ValueError, match="not a path"):
        engine.keep([1])  # not from a root
    engine.keep([0, 2])
    with pytest.raises(ValueError, match="follows a tree step"):
        engine.keep([0])  # kept already


@pytest.mark.parametrize("kernel", ATTENTION)
def test_attention_reads_the_filled_buckets_only_whatever_the_capacity(kernel):
    stages = _stages("target")
    ids, visual = _prompt(stages)
    embeds = stages.embed(ids, visual)
    outputs = []
    for capacity in (ids.shape[1] + 8, 8192):
        engine = LlamaEngine(stages.language_model, stages.lm_head, max_length=capacity, attention=(kernel, kernel))
        engine.prefill(embeds)
        outputs.append(engine.step(torch.tensor([[5, 7]])).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)  # the same bucket: bit for bit


@pytest.mark.parametrize("compile", [False, True])
def test_steps_run_the_attention_kernel_chosen_for_their_length(compile):
    """One-token steps and verifies each run the kernel `attention` names for them (the library's fused op
    shows in the profile; the matmul kernel does not call it), compiled or not."""
    stages = _stages("target")
    ids, visual = _prompt(stages)
    for attention in (("fused", "matmul"), ("matmul", "fused")):
        engine = LlamaEngine(stages.language_model, stages.lm_head, max_length=ids.shape[1] + 8, compile=compile,
                             attention=attention)  # fmt: skip
        engine.prefill(stages.embed(ids, visual))
        for n, kernel in ((1, attention[0]), (3, attention[1])):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                engine.step(torch.tensor([[5] * n]))
            ran_fused = any(event.name == "evspec::fused_attention" for event in profiler.events())
            assert ran_fused == (kernel == "fused"), (attention, n)


def test_both_attention_kernels_compute_masked_attention_with_grouped_heads():
    """Each query row has its own visible length, so a bias broadcast over the wrong axis (query rows vs
    the heads grouped on one kv head) changes the result."""
    torch.manual_seed(0)
    q = torch.randn(1, 8, 3, 16)
    keys, values = torch.randn(2, 1, 4, 1024, 16)
    visible = torch.arange(512)[None, :] <= torch.tensor([100, 301, 450])[:, None]
    keys, values = keys[:, :, :512], values[:, :, :512]  # a bucket of a larger cache, as steps read it
    grouped_keys, grouped_values = keys.repeat_interleave(2, dim=1), values.repeat_interleave(2, dim=1)  # repeat_kv
    scores = (q @ grouped_keys.transpose(-1, -2)) / 4.0
    expected = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ grouped_values
    bias = additive_mask(visible, q.dtype)
    for kernel in ATTENTION:
        torch.testing.assert_close(attend(q, keys, values, bias, kernel), expected, rtol=1e-5, atol=1e-5)


def test_engine_refuses_to_overflow_or_rewind_forward():
    stages = _stages("target")
    engine = LlamaEngine(stages.language_model, stages.lm_head, max_length=4)
    assert engine.capacity == BUCKET  # whole buckets
    engine.step(torch.tensor([[1] * (BUCKET - 1)]))
    with pytest.raises(ValueError, match="full"):
        engine.step(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="cannot rewind"):
        engine.rewind(BUCKET + 1)


def test_fusing_keeps_one_copy_of_the_weights():
    stages = _stages("target")
    attention = stages.language_model.layers[0].self_attn
    LlamaEngine(stages.language_model, stages.lm_head, max_length=8)
    fused = attention.q_proj.weight.data
    assert attention.k_proj.weight.data.data_ptr() == fused.data_ptr() + fused.numel() * fused.element_size()


# ---- the head engine ------------------------------------------------------------------------------
HIDDEN, EVENT = 32, 24


DRAFT_VOCAB = torch.tensor([0, 2, 3, 5, 8, 13, 21, 22, 30, 34, 40, 41, 42, 50, 55, 59])  # incl. the first and last


def _head(use_events: bool = True, draft_vocab: torch.Tensor | None = None) -> tuple[DraftHead, torch.nn.Embedding, torch.nn.Linear]:
    torch.manual_seed(3)
    head = DraftHead(HeadConfig(hidden_size=HIDDEN, event_size=EVENT, n_heads=4, intermediate_size=48,
                                adapter_hidden_size=16, use_events=use_events,
                                draft_vocab_size=None if draft_vocab is None else len(draft_vocab))).eval()  # fmt: skip
    for parameter in head.parameters():  # trained heads are not near-identity: make every weight matter
        torch.nn.init.normal_(parameter, std=0.3)
    if draft_vocab is not None:
        head.set_draft_vocab(draft_vocab[torch.randperm(len(draft_vocab))])  # any order in, ascending kept
    return head, torch.nn.Embedding(VOCAB, HIDDEN), torch.nn.Linear(HIDDEN, VOCAB, bias=False)


def _reference_proposal(head, embed, lm_head, events, hidden, tokens, k, spec, uniforms):
    """The head's training forward over the whole history, re-run for every draft (no cache); outside a
    draft vocabulary the logits are -inf (the draft's law is zero there)."""
    prefix = head.event_prefix(None if events is None else events[None])
    ids, probs = [], []
    for j in range(k):
        state = head(hidden[None], embed(tokens)[None], prefix)[0, -1]
        logits = lm_head(state)[None]
        if head.draft_vocab is not None:
            outside = torch.ones_like(logits, dtype=torch.bool).index_fill_(1, head.draft_vocab, False)
            logits = logits.masked_fill(outside, float("-inf"))
        if spec.greedy:
            token, q = logits.argmax(-1), None
        else:
            q = spec.probabilities(logits)
            token = inverse_cdf(q, uniforms[j : j + 1])
        ids.append(int(token))
        probs.append(q)
        hidden, tokens = torch.cat([hidden, state[None]]), torch.cat([tokens, token])
    return ids, probs


@pytest.mark.parametrize("spec", [SamplingSpec(), SamplingSpec(temperature=0.8, top_k=20, top_p=0.9)],
                         ids=["greedy", "sampling"])  # fmt: skip
@pytest.mark.parametrize("use_events, draft_vocab", [(True, None), (False, None), (True, DRAFT_VOCAB)],
                         ids=["events", "text-only", "draft-vocab"])  # fmt: skip
@torch.no_grad()
def test_head_engine_proposals_equal_the_heads_own_forward(spec, use_events, draft_vocab):
    head, embed, lm_head = _head(use_events, draft_vocab)
    events = torch.randn(7, EVENT)
    generator = torch.Generator().manual_seed(4)
    sampler = Sampler(spec, torch.Generator().manual_seed(5))
    engine = HeadEngine(head, embed, lm_head, max_events=7, max_answer=BUCKET + 40, max_k=5, sampler=sampler)
    engine.load_events(events)
    hidden, tokens = torch.randn(1, HIDDEN), torch.tensor([int(torch.randint(3, VOCAB, (1,)))])
    engine.start(int(tokens[0]), hidden[0])
    while len(tokens) < BUCKET + 20:  # cycles of every k and every accepted count, across a length bucket
        k = int(torch.randint(1, 6, (1,), generator=generator))
        state = sampler.generator.get_state()
        ids, probs = engine.propose(k)
        uniforms = torch.rand(k, generator=torch.Generator().set_state(state))  # what the engine drew from
        expected_ids, expected_probs = _reference_proposal(head, embed, lm_head, events if use_events else None,
                                                           hidden, tokens, k, spec, uniforms)  # fmt: skip
        assert ids.tolist() == expected_ids
        if draft_vocab is not None:
            assert set(ids.tolist()) <= set(draft_vocab.tolist())
        if not spec.greedy:
            torch.testing.assert_close(probs, torch.cat(expected_probs), rtol=0, atol=1e-5)
        m = int(torch.randint(1, k + 2, (1,), generator=generator))  # the target kept m tokens
        kept_hidden, kept = torch.randn(m, HIDDEN), torch.randint(3, VOCAB, (m,), generator=generator)
        engine.commit(kept.tolist(), kept_hidden)
        hidden, tokens = torch.cat([hidden, kept_hidden]), torch.cat([tokens, kept])


@torch.no_grad()
def test_head_engine_walks_a_long_history_committed_at_once():
    """Evaluation commits a whole prefix before proposing: the pairs past the slots are cached first."""
    head, embed, lm_head = _head()
    events = torch.randn(7, EVENT)
    engine = HeadEngine(head, embed, lm_head, 7, 64, 3, Sampler())
    engine.load_events(events)
    hidden, tokens = torch.randn(30, HIDDEN), torch.randint(3, VOCAB, (30,))
    engine.start(int(tokens[0]), hidden[0])
    engine.commit(tokens[1:].tolist(), hidden[1:])
    expected, _ = _reference_proposal(head, embed, lm_head, events, hidden, tokens, 3, SamplingSpec(), None)
    assert engine.propose(3)[0].tolist() == expected


def _reference_tree(head, embed, lm_head, events, hidden, tokens, depth, top_k, nodes, spec):
    """EAGLE-2's tree from the head's training forward, re-run for every node over its whole path (no cache):
    a node is the pair (its parent's predicted state, its token); levels keep the top_k children of the level
    before by cumulative log-probability (warped when sampling), then the `nodes` best and their ancestors."""
    prefix = head.event_prefix(None if events is None else events[None])

    def log_probs(state):
        logits = lm_head(state)
        logits = logits if head.draft_vocab is None else logits[head.draft_vocab]
        return (logits if spec.greedy else spec.warp(logits)).float().log_softmax(-1)

    root = head(hidden[None], embed(tokens)[None], prefix)[0, -1]
    ids, parents, scores, paths = [], [], [], []  # paths: (hidden, tokens) of the sequence ending at the node
    layer, rows = [-1], log_probs(root)[None]
    for _ in range(depth):
        best = rows.flatten().topk(min(top_k, rows.numel()))
        vocab, previous, layer = rows.shape[-1], layer, []
        for flat, score in zip(best.indices.tolist(), best.values.tolist()):
            if score == float("-inf"):
                continue
            parent = previous[flat // vocab]
            token = flat % vocab if head.draft_vocab is None else int(head.draft_vocab[flat % vocab])
            before_hidden, before_tokens, parent_state = (hidden, tokens, root) if parent < 0 else paths[parent][:3]
            layer.append(len(ids))
            ids.append(token)
            parents.append(parent)
            scores.append(score)
            path_hidden, path_tokens = torch.cat([before_hidden, parent_state[None]]), torch.cat([before_tokens, torch.tensor([token])])
            paths.append((path_hidden, path_tokens, head(path_hidden[None], embed(path_tokens)[None], prefix)[0, -1]))
        if not layer:
            break
        rows = torch.stack([scores[c] + log_probs(paths[c][2]) for c in layer])
    chosen = sorted(sorted(range(len(ids)), key=lambda c: -scores[c])[:nodes])
    ancestors = set()
    for c in chosen:
        while c >= 0:
            ancestors.add(c)
            c = parents[c]
    chosen = sorted(ancestors)
    index = {c: i for i, c in enumerate(chosen)}
    return [ids[c] for c in chosen], [index.get(parents[c], -1) for c in chosen]


@pytest.mark.parametrize("spec", [SamplingSpec(), SamplingSpec(temperature=0.8, top_k=20, top_p=0.9)],
                         ids=["greedy", "sampling"])  # fmt: skip
@pytest.mark.parametrize("use_events, draft_vocab", [(True, None), (False, None), (True, DRAFT_VOCAB)],
                         ids=["events", "text-only", "draft-vocab"])  # fmt: skip
@torch.no_grad()
def test_head_engine_trees_equal_the_heads_own_forward(spec, use_events, draft_vocab):
    """Every node of every tree (its token, its parent) is what the head's training forward over the node's
    whole path gives, cycle after cycle of random commits and across a length bucket; a tree with top-k 1
    is the chain `propose` drafts."""
    head, embed, lm_head = _head(use_events, draft_vocab)
    events = torch.randn(7, EVENT)
    generator = torch.Generator().manual_seed(4)
    engine = HeadEngine(head, embed, lm_head, max_events=7, max_answer=BUCKET + 40, max_k=8,
                        sampler=Sampler(spec, torch.Generator().manual_seed(5)))  # fmt: skip
    engine.load_events(events)
    hidden, tokens = torch.randn(1, HIDDEN), torch.tensor([int(torch.randint(3, VOCAB, (1,)))])
    engine.start(int(tokens[0]), hidden[0])
    cycle = 0
    while len(tokens) < BUCKET + 20:
        depth, top_k, nodes = [(3, 2, 5), (2, 3, 6), (4, 2, 8), (2, 4, 3)][cycle % 4]
        ids, parents = engine.draft_tree(depth, top_k, nodes)
        expected = _reference_tree(head, embed, lm_head, events if use_events else None, hidden, tokens, depth, top_k,
                                   nodes, spec)  # fmt: skip
        assert (ids.tolist(), parents) == expected, cycle
        m = int(torch.randint(1, depth + 2, (1,), generator=generator))  # the target kept m tokens
        kept_hidden, kept = torch.randn(m, HIDDEN), torch.randint(3, VOCAB, (m,), generator=generator)
        engine.commit(kept.tolist(), kept_hidden)
        hidden, tokens = torch.cat([hidden, kept_hidden]), torch.cat([tokens, kept])
        cycle += 1
    if spec.greedy:  # top-k 1: one path, the chain's drafts
        chain = copy.deepcopy(engine)
        chain_ids, _ = chain.propose(3)
        tree_ids, parents = engine.draft_tree(3, 1, 3)
        assert (tree_ids.tolist(), parents) == (chain_ids.tolist(), [-1, 0, 1])
