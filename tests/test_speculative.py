"""Speculative decoding is lossless: greedy ids equal the target's; sampling draws from the target's law."""

from __future__ import annotations

import copy
import functools

import pytest
import pandas as pd
import torch
from transformers import VideoLlavaForConditionalGeneration

from evspec.adapter.modules import DraftHead, HeadConfig
from evspec.models.configs import tiny_eventgpt_config, tiny_video_llava_config
from evspec.models.eventgpt import EventGPTForCausalLM
from evspec.models.stages import EventGPTStages, VideoLlavaStages
from evspec.models.tokenizer import SharedVocabulary
from evspec.speculative.decode import decode_speculative, decode_speculative_tree, decode_target
from evspec.engine.head import HeadEngine
from evspec.speculative.drafters import (CascadeDrafter, EdgeTokenDrafter, HeadTreeDrafter, HybridDrafter, TokenDrafter,
                                         TokenTreeDrafter, lookup_continuation)
from evspec.speculative.link import Link
from evspec.speculative.sampling import Sampler

EOS = 2


def _models(vocab: int, seed: int):
    torch.manual_seed(seed)
    target = VideoLlavaStages(VideoLlavaForConditionalGeneration(tiny_video_llava_config(vocab + 2, vocab + 1, vocab)).eval())
    draft = EventGPTStages(EventGPTForCausalLM(tiny_eventgpt_config(vocab)).eval())
    return target, draft


def shared(rows: int, n_shared: int | None = None) -> SharedVocabulary:
    """Draft ids 0..n_shared-1 shared with the target (all `rows` by default); <unk> is id 0."""
    return SharedVocabulary(torch.arange(rows) < (rows if n_shared is None else n_shared), unknown_id=0)


def _prefilled(stages, n_images: int, prompt: list[int], max_length: int, seed: int):
    """A fast engine over `stages` with a random clip's prompt prefilled."""
    torch.manual_seed(seed)
    visual = stages.project(stages.encode_vision(torch.randn(n_images, 3, 28, 28)))
    ids = torch.tensor([[1, *[stages.placeholder_id] * visual.shape[0], *prompt]])
    engine = stages.engine(max_length)
    return engine, engine.prefill(stages.embed(ids, visual)), ids, visual


def _head_engine(head: DraftHead, target: VideoLlavaStages, k: int) -> HeadEngine:
    engine = HeadEngine(head, target.language_model.embed_tokens, target.lm_head, 7, 32, k, Sampler())
    engine.load_events(torch.randn(7, 32))
    return engine


def _target_and_reference(vocab: int, seed: int):
    """The seed's pair, a random prompt prefilled on the target's engine, and transformers' greedy answer."""
    target, draft = _models(vocab, seed)
    prompt = torch.randint(3, vocab, (4,), generator=torch.Generator().manual_seed(seed)).tolist()
    engine, prefill, ids, visual = _prefilled(target, 8, prompt, 400, seed)
    reference = target.greedy_with_hidden(ids, visual, max_new_tokens=24, eos_token_id=EOS)[0]
    return target, draft, prompt, engine, prefill, ids, reference


@pytest.mark.parametrize("seed", range(6))
def test_greedy_speculative_equals_target(seed):
    vocab = 60
    target, draft, prompt, engine, prefill, ids, reference = _target_and_reference(vocab, seed)
    baseline = decode_target(engine, prefill.logits, 24, EOS, Sampler())
    assert baseline.output_ids == reference
    head = DraftHead(HeadConfig(hidden_size=32, event_size=32, n_heads=2, intermediate_size=32, adapter_hidden_size=16))
    perfect = copy.deepcopy(target)  # the target drafting for itself: every draft is accepted
    for k in (1, 3, 5):
        drafters = {
            "eventgpt": lambda: TokenDrafter(_prefilled(draft, 5, prompt, 400, seed)[0], shared(vocab), vocab + 2,
                                             Sampler()),
            "self": lambda: TokenDrafter(_prefilled(perfect, 8, prompt, 400, seed)[0], shared(vocab + 2), vocab + 2,
                                         Sampler()),
            "head": lambda: _head_engine(head, target, k),
        }
        for name, make in drafters.items():
            engine.rewind(ids.shape[1])
            result = decode_speculative(engine, prefill, make(), k, 24, EOS, Sampler())
            assert result.output_ids == reference, (name, k)
            assert result.accepted <= result.drafted
            if name == "self":
                assert result.accepted == result.drafted  # exercises the all-accepted path


class ScriptedTree:
    """A tree drafter that knows the target's answer: per cycle, 1-3 branches of random depth under the last
    committed token; one of them (when `hit` comes up) follows the answer for a while, then goes wrong."""

    def __init__(self, answer: list[int], vocab: int, hit: float, seed: int) -> None:
        self.answer, self.vocab, self.hit = answer, vocab, hit
        self.random = torch.Generator().manual_seed(seed)
        self.committed = 0
        self.trees: list[tuple[list[int], list[int]]] = []

    def _draw(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.random))

    def start(self, first_token: int, first_hidden: torch.Tensor) -> None:
        self.committed = 1

    def propose_tree(self) -> tuple[torch.Tensor, list[int]]:
        ids, parents = [], []
        for branch in range(1 + self._draw(3)):
            true = branch == 0 and self._draw(100) < 100 * self.hit
            parent = -1
            for depth in range(1 + self._draw(4)):
                position = self.committed + depth
                right = true and position < len(self.answer) and self._draw(4) > 0
                token = self.answer[position] if right else 3 + self._draw(self.vocab - 3)
                ids.append(token)
                parents.append(parent)
                parent = len(ids) - 1
                true = right
        self.trees.append((ids, parents))
        return torch.tensor(ids), parents

    def commit(self, tokens: list[int], hidden: torch.Tensor) -> None:
        assert hidden.shape[0] == len(tokens)
        self.committed += len(tokens)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_tree_verification_equals_target(seed):
    """Any tree, right or wrong anywhere, yields the target's own greedy answer; right branches are kept."""
    vocab = 60
    _, _, _, engine, prefill, ids, reference = _target_and_reference(vocab, seed)
    for hit in (0.0, 0.7, 1.0):
        engine.rewind(ids.shape[1])
        drafter = ScriptedTree(reference, vocab, hit, seed)
        result = decode_speculative_tree(engine, prefill, drafter, 4, 24, EOS, Sampler())
        assert result.output_ids == reference, hit
        assert result.accepted <= result.drafted and result.target_forwards == len(drafter.trees)
        assert sum(result.accepted_per_position) == result.accepted
        assert all(a <= r <= d for a, r, d in zip(result.accepted_per_position, result.reached_per_position,
                                                  result.drafted_per_position))  # fmt: skip
        if hit == 1.0 and len(reference) > 4:
            assert result.accepted > 0 and result.target_forwards < len(reference)
    deep = ScriptedTree(reference, vocab, 0.0, seed)
    deep.propose_tree = lambda: (torch.tensor([5, 6, 7, 8]), [-1, 0, 1, 2])  # a chain of 4 drafts
    engine.rewind(ids.shape[1])
    with pytest.raises(ValueError, match="depth 4, deeper than 3"):
        decode_speculative_tree(engine, prefill, deep, 3, 24, EOS, Sampler())


def test_tree_counts_a_depth_reached_only_where_the_accepted_path_has_a_draft_below():
    """Cycle 1: a wrong draft with a child, and the right draft as a leaf: depth 1 accepted, depth 2 drafted
    (under the wrong one) but not reached. Cycle 2: one wrong leaf."""
    vocab = 60
    _, _, _, engine, prefill, ids, reference = _target_and_reference(vocab, 0)
    assert len(reference) >= 5
    wrong = next(t for t in range(3, vocab) if t not in reference)
    trees = iter([(torch.tensor([wrong, reference[1], wrong]), [-1, -1, 0]), (torch.tensor([wrong]), [-1])])
    drafter = ScriptedTree(reference, vocab, 0.0, 0)
    drafter.propose_tree = lambda: next(trees)
    result = decode_speculative_tree(engine, prefill, drafter, 2, 4, EOS, Sampler())
    assert result.output_ids == reference[:4] and result.target_forwards == 2
    assert (result.drafted_per_position, result.reached_per_position, result.accepted_per_position) == \
        ([2, 1], [2, 0], [1, 0])  # fmt: skip


@pytest.mark.parametrize("seed", range(4))
def test_head_tree_drafts_are_lossless(seed):
    """EAGLE-2 trees from the draft head's engine (with and without a draft vocabulary) leave the target's
    answer unchanged, whatever the (random) head proposes."""
    vocab = 60
    target, _, _, engine, prefill, ids, reference = _target_and_reference(vocab, seed)
    for draft_vocab in (None, 16):
        torch.manual_seed(seed)
        head = DraftHead(HeadConfig(hidden_size=32, event_size=32, n_heads=2, intermediate_size=32,
                                    adapter_hidden_size=16, draft_vocab_size=draft_vocab))  # fmt: skip
        if draft_vocab:
            head.set_draft_vocab(torch.randperm(vocab)[:draft_vocab])
        for depth, top_k, nodes in ((1, 3, 3), (3, 2, 5), (4, 3, 12)):
            engine.rewind(ids.shape[1])
            drafter = HeadTreeDrafter(_head_engine(head, target, depth * top_k), depth, top_k, nodes)
            result = decode_speculative_tree(engine, prefill, drafter, depth, 24, EOS, Sampler())
            assert result.output_ids == reference, (draft_vocab, depth, top_k, nodes)
            assert result.drafted > 0 and len(result.drafted_per_position) == depth


def _fresh_chain(stages, prompt: list[int], vocab: int, seed: int, committed: list[int], k: int, n_images: int = 5,
                 rows: int | None = None) -> list[int]:
    """The greedy chain of k over the shared ids (< vocab) that `stages` (EventGPT by default; a copy of the target
    with `n_images` 8 and its `rows` of logits) drafts after the prompt and `committed`, read as a drafter reads it
    (ids it does not share are <unk>), from a fresh prefill (no cache carried over)."""
    readable = shared(rows or vocab, vocab).readable(committed)
    fresh, out, _, _ = _prefilled(stages, n_images, prompt + readable, 400, seed)
    chain = []
    for _ in range(k):
        chain.append(int(out.logits[0, -1, :vocab].argmax()))
        out = fresh.step(torch.tensor([[chain[-1]]]))
    return chain


class _OracleChain:
    """A head stand-in that drafts the target's own greedy answer: every draft it proposes is kept."""

    def __init__(self, answer: list[int]) -> None:
        self.answer = answer

    def start(self, first_token: int, first_hidden: torch.Tensor) -> None:
        self.length = 1

    def propose(self, k: int):
        return torch.tensor((self.answer + [EOS] * k)[self.length : self.length + k]), None

    def commit(self, tokens: list[int], hidden: torch.Tensor) -> None:
        self.length += len(tokens)


class _CheckedHybrid(HybridDrafter):
    """Checks at every proposal that EventGPT's chain is what EventGPT, prefilled afresh with the prompt and the
    tokens committed so far, drafts greedily: its cache kept exactly its drafts on the kept paths."""

    def __init__(self, token, head, k, fresh_chain) -> None:
        super().__init__(token, head, k)
        self.fresh_chain, self.checked = fresh_chain, 0

    def start(self, first_token: int, first_hidden: torch.Tensor) -> None:
        super().start(first_token, first_hidden)
        self.committed = [first_token]

    def propose_tree(self):
        out = super().propose_tree()
        if len(self.committed) < 20:  # the later cycles may run into the answer's end
            assert self.chains[0] == self.fresh_chain(self.committed, self.k), self.committed
            self.checked += 1
        return out

    def commit(self, tokens: list[int], hidden: torch.Tensor) -> None:
        super().commit(tokens, hidden)
        self.committed += tokens


@pytest.mark.parametrize("seed", range(3))
def test_hybrid_trees_are_lossless_and_eventgpt_keeps_only_its_drafts_on_the_kept_path(seed):
    """EventGPT's chain and the head's chain as one tree leave the target's answer unchanged. With a head that
    drafts the target's answer the kept path follows the head's branch, so EventGPT's own chain is mostly
    rejected: its cache must keep just its drafts on the kept path (checked against EventGPT prefilled afresh),
    and the per-source counts must say who proposed what was kept."""
    vocab = 60
    target, draft, prompt, engine, prefill, ids, reference = _target_and_reference(vocab, seed)
    fresh_chain = functools.partial(_fresh_chain, draft, prompt, vocab, seed)
    torch.manual_seed(seed)
    head = DraftHead(HeadConfig(hidden_size=32, event_size=32, n_heads=2, intermediate_size=32, adapter_hidden_size=16))
    checked = 0
    for k in (1, 3, 5):
        engine.rewind(ids.shape[1])
        random_head = HybridDrafter(TokenDrafter(_prefilled(draft, 5, prompt, 400, seed)[0], shared(vocab), vocab + 2,
                                                 Sampler()), _head_engine(head, target, k), k)  # fmt: skip
        result = decode_speculative_tree(engine, prefill, random_head, k, 24, EOS, Sampler())
        assert result.output_ids == reference, k
        engine.rewind(ids.shape[1])
        oracle = _CheckedHybrid(TokenDrafter(_prefilled(draft, 5, prompt, 400, seed)[0], shared(vocab), vocab + 2,
                                             Sampler()), _OracleChain(reference), k, fresh_chain)  # fmt: skip
        result = decode_speculative_tree(engine, prefill, oracle, k, 24, EOS, Sampler())
        assert result.output_ids == reference and oracle.checked >= 1, k
        checked += oracle.checked
        assert result.target_forwards == -(-(len(reference) - 1) // (k + 1))  # the head's branch: all k kept
        # every kept token but the target's own one per cycle was the head's draft (the last cycle's drafts
        # past the answer's end count too)
        assert oracle.counts["accepted_from_head"] >= len(reference) - 1 - result.target_forwards
        assert oracle.counts["accepted_from_eventgpt"] < oracle.counts["accepted_from_head"]
    assert checked >= 4  # proposals whose EventGPT chain was checked, over the three k


def test_lookup_continues_after_the_latest_occurrence_of_the_longest_recurring_suffix():
    assert lookup_continuation([5, 6, 7, 9, 5, 6, 7, 8, 5, 6, 7], 2) == [8, 5]  # 3-gram, latest occurrence
    assert lookup_continuation([1, 2, 3, 4, 9, 4], 3) == [9, 4]  # 1-gram, at most what follows it
    assert lookup_continuation([1, 2, 3, 4], 3) == [] and lookup_continuation([4, 4], 0) == []
    assert lookup_continuation([7, 1, 2, 7, 3, 1, 2], 1, max_ngram=2) == [7]  # the 2-gram beats the later 1-gram


class _CheckedCascade(CascadeDrafter):
    """Checks at every proposal that the cascade's chain is EventGPT's own greedy chain, drafted afresh."""

    def __init__(self, fresh_chain, *args) -> None:
        super().__init__(*args)
        self.fresh_chain, self.checked = fresh_chain, 0

    def propose(self, k: int):
        ids, probs = super().propose(k)
        assert ids.tolist() == self.fresh_chain(self.history, k), self.history
        self.checked += 1
        return ids, probs


def test_cascade_drafts_eventgpts_own_chain_in_fewer_eventgpt_forwards():
    """Prompt lookup in front of EventGPT changes how many forwards EventGPT runs, never what it drafts: at every
    proposal the chain equals EventGPT's greedy chain from a fresh prefill of the prompt and the committed answer,
    the target's answer is unchanged, and, over the seeds' answers (some loop, some end early), both of the
    lookup's outcomes ran: a guess kept, a guess rejected and rewound."""
    vocab = 60
    counts = dict.fromkeys(("lookup_drafted", "lookup_accepted", "eventgpt_forwards", "eventgpt_drafts"), 0)
    for seed in range(4):
        target, draft, prompt, engine, prefill, ids, reference = _target_and_reference(vocab, seed)
        fresh_chain = functools.partial(_fresh_chain, draft, prompt, vocab, seed)
        for k in (1, 4):
            engine.rewind(ids.shape[1])
            cascade = _CheckedCascade(fresh_chain, _prefilled(draft, 5, prompt, 400, seed)[0], shared(vocab),
                                      vocab + 2, Sampler())  # fmt: skip
            result = decode_speculative(engine, prefill, cascade, k, 24, EOS, Sampler())
            assert result.output_ids == reference, (seed, k)
            assert cascade.checked == result.target_forwards
            assert cascade.counts["eventgpt_drafts"] == k * cascade.checked
            counts = {name: counts[name] + cascade.counts[name] for name in counts}
    assert 0 < counts["lookup_accepted"] < counts["lookup_drafted"], counts
    assert counts["eventgpt_forwards"] < counts["eventgpt_drafts"]  # kept guesses saved forwards


@pytest.mark.parametrize("seed", range(3))
def test_eventgpt_tree_drafts_are_lossless_and_a_perfect_draft_fills_every_level(seed):
    """EAGLE-2 trees from EventGPT's engine (levels grown on its own tree cache) leave the target's answer
    unchanged; the target drafting for itself always has its first draft accepted, and, as a chain
    (top_k 1), every draft."""
    vocab = 60
    target, draft, prompt, engine, prefill, ids, reference = _target_and_reference(vocab, seed)
    for depth, top_k, nodes in ((1, 1, 1), (4, 1, 4), (3, 2, 6), (4, 3, 12), (4, 3, 7)):  # the last prunes by score
        drafters = {"eventgpt": lambda: _prefilled(draft, 5, prompt, 400, seed)[0],
                    "self": lambda: _prefilled(copy.deepcopy(target), 8, prompt, 400, seed)[0]}  # fmt: skip
        for name, make in drafters.items():
            engine.rewind(ids.shape[1])
            drafter = TokenTreeDrafter(make(), shared(vocab + 2 if name == "self" else vocab), Sampler(), depth,
                                       top_k, nodes)  # fmt: skip
            result = decode_speculative_tree(engine, prefill, drafter, depth, 24, EOS, Sampler())
            assert result.output_ids == reference, (name, depth, top_k, nodes)
            assert len(result.drafted_per_position) == depth  # one count per depth, whatever the trees
            if name == "self":  # level 1 holds the target's own argmax: every cycle keeps its first draft
                assert result.accepted_per_position[0] == result.drafted_per_position[0] > 0
            if name == "self" and top_k == 1:  # a chain of the target's own argmax: every level is kept
                assert result.target_forwards == -(-(len(reference) - 1) // (depth + 1)), (depth, result.target_forwards)


def test_speculate_runs_every_method_losslessly_and_summarizes(tiny_pair_dir, tiny_data, tmp_path):
    from evspec.adapter.modules import DraftHead, HeadConfig
    from evspec.models.toy import load_pair
    from evspec.speculative.run import SpecSettings, speculate
    from evspec.speculative.summary import summarize

    pair = load_pair(tiny_pair_dir / "draft", tiny_pair_dir / "target", tiny_pair_dir / "draft_tokenizer",
                     tiny_pair_dir / "target_tokenizer")  # fmt: skip
    torch.manual_seed(0)
    head = DraftHead(HeadConfig(hidden_size=32, event_size=32, n_heads=2, intermediate_size=32, adapter_hidden_size=16))
    settings = SpecSettings(max_new_tokens=6, max_clips=3, split="train", tree_top_k=2, tree_nodes=5,
                            methods=("target", "hf-generate", "hf-assisted", "token", "token-tree", "feature",
                                     "feature-tree", "hybrid", "cascade", "prefill", "target-1frame"),
                            draft_lengths={"hf-assisted": [2], "token": [1, 3], "token-tree": [3], "feature": [2],
                                           "feature-tree": [2], "hybrid": [2], "cascade": [3], "prefill": [2]})  # fmt: skip
    embeddings = pair.draft.get_input_embeddings()
    frames = speculate(pair, head, tiny_data, settings, shard=0, n_shards=1, out_dir=tmp_path)
    assert pair.draft.get_input_embeddings() is embeddings  # transformers' assisted decoding left EventGPT whole
    target = frames["target"].set_index("sample_id")
    assert len(target) == 3 and (target["status"] == "ok").all()
    for method in ("hf-generate", "token", "token-tree", "feature", "feature-tree", "hybrid", "cascade", "prefill"):
        rows = frames[method]
        assert (rows["status"] == "ok").all() and rows["exact_match"].all(), method
        assert set(rows["k"]) == {0} if method == "hf-generate" else True
    assert sorted(frames["token"]["k"].unique()) == [1, 3]
    assert (frames["hf-assisted"]["status"].str.startswith("not run") | frames["hf-assisted"]["exact_match"]).all()
    summary = summarize(tmp_path, tmp_path / "summary.json", tiny_data / "manifest.parquet")
    entries = {(e["method"], e["k"]): e for e in summary["methods"]}
    types = pd.read_parquet(tiny_data / "manifest.parquet").set_index("sample_id")["question_type"]
    token = frames["token"][frames["token"]["k"] == 3].set_index("sample_id")
    ratios = (target["total_ms"] / token["total_ms"]).groupby(types.reindex(target.index)).median()
    by_type = entries[("token", 3)]["by_question_type"]
    assert {t: e["speedup_median"] for t, e in by_type.items()} == pytest.approx(ratios.to_dict())
    assert sum(e["n_clips"] for e in by_type.values()) == 3
    assert entries[("token", 3)]["exact_match_rate"] == 1.0
    assert 0.0 <= entries[("feature", 2)]["alpha"] <= 1.0
    assert entries[("target", 0)]["speedup_median"] == 1.0
    assert "predicted_decode_speedup" in entries[("token", 3)]
    for tree in (("token-tree", 3), ("feature-tree", 2), ("hybrid", 2)):
        assert "predicted_decode_speedup" in entries[tree] and entries[tree]["verify_ratio"] > 0, tree
    one_frame = frames["target-1frame"].set_index("sample_id")
    assert (one_frame["status"] == "ok").all() and len(one_frame) == 3  # its answers may differ (agreement, not lossless)
    assert entries[("target-1frame", 0)]["exact_match_rate"] == one_frame["exact_match"].mean()
    hybrid = frames["hybrid"]
    assert set(entries[("hybrid", 2)]["accepted_by_source"]) == {"eventgpt", "head"}
    stages = entries[("cascade", 3)]["cascade"]  # the cascade's first stage, from its per-clip counts
    assert stages["eventgpt_drafts"] == 3 * (frames["cascade"]["target_forwards"] - 1).sum()
    assert 0 < stages["eventgpt_forwards"] <= stages["eventgpt_drafts"]
    assert (hybrid[["accepted_from_eventgpt", "accepted_from_head"]].max(axis=1) <= hybrid["accepted"] + 2).all()


def test_drafts_past_the_answers_end_are_not_counted():
    """The target drafting for itself accepts every draft; with 3 tokens wanted and k = 4, the one cycle
    needs positions 1 and 2 only (the first token came from the prefill): the others count neither way."""
    target, _ = _models(60, 0)
    prompt = [5, 7, 9]
    engine, prefill, ids, _ = _prefilled(target, 8, prompt, 400, 0)
    drafter = TokenDrafter(_prefilled(copy.deepcopy(target), 8, prompt, 400, 0)[0], shared(62), 62, Sampler())
    result = decode_speculative(engine, prefill, drafter, 4, 3, None, Sampler())
    assert len(result.output_ids) == 3 and result.target_forwards == 1
    assert (result.drafted, result.accepted) == (2, 2)
    assert result.drafted_per_position == result.reached_per_position == result.accepted_per_position == [1, 1, 0, 0]


def test_stage_timing_times_every_stage_and_tree_verifies_on_the_cpu(tiny_pair_dir, tmp_path):
    from evspec.bench.stages import BenchSettings, bench_stages, tree_parents

    assert tree_parents(6) == [-1, 0, 0, 0, 0, 1, 1]  # [last] + 6 drafts: 4 under last, 2 under the first
    parts = ("draft", "target", "draft_tokenizer", "target_tokenizer")
    frame = bench_stages(BenchSettings(repeats=2, warmup=1, verify_lengths=[2], tree_sizes=[4, 9]),
                         {part: tiny_pair_dir / part for part in parts}, tmp_path / "stages.parquet")  # fmt: skip
    assert {"vision", "prefill", "decode_step", "verify", "tree_verify", "draft_head_token",
            "draft_head_tree"} <= set(frame["stage"])
    assert frame.loc[frame["stage"] == "draft_head_tree", ["k", "tree_nodes"]].values.tolist() == [[4, 16]]
    assert sorted(frame[frame["stage"] == "tree_verify"]["k"]) == [4, 9]
    assert (frame["ms_median"] > 0).all()


class _CheckedEdge(EdgeTokenDrafter):
    """Checks at every proposal that the chain sent up is the drafting engine's own greedy chain after the committed
    answer, drafted afresh (`fresh_chain`), whether it was drafted in the cycle or ahead of it; and after every
    cycle that its cache holds the committed answer (but the pending tokens) and, after drafts made ahead are
    taken, the drafts after it, with the rewind point at the committed answer's end."""

    def __init__(self, fresh_chain, *args) -> None:
        super().__init__(*args)
        self.fresh_chain, self.checked, self.prompt_length = fresh_chain, 0, self.draft.length

    def start(self, first_token: int, first_hidden: torch.Tensor) -> None:
        super().start(first_token, first_hidden)
        self.committed = [first_token]

    def propose(self, k: int):
        ids, probs = super().propose(k)
        assert ids.tolist() == self.fresh_chain(self.committed, k), (self.committed, self.counts)
        self.checked += 1
        return ids, probs

    def keep(self, matched: int, tokens: list[int]) -> None:
        super().keep(matched, tokens)
        self.committed += tokens
        committed_length = self.prompt_length + len(self.committed)
        if self.next_proposal is None:
            assert self.draft.length + len(self.pending) == committed_length
        else:  # it holds the drafts made ahead but the last
            assert self.base == committed_length and self.draft.length == committed_length + len(self.proposed) - 1


def _noisy_copy(target: VideoLlavaStages, noise: float, seed: int) -> VideoLlavaStages:
    """The target with its language model's weights perturbed: a drafter that agrees with it often, not always."""
    torch.manual_seed(seed)
    copied = copy.deepcopy(target)
    with torch.no_grad():
        for parameter in copied.language_model.parameters():
            parameter.add_(noise * parameter.std() * torch.randn_like(parameter))
    return copied


def test_over_a_link_eventgpt_drafts_ahead_its_own_chain_and_the_answer_is_the_targets():
    """`token` over an edge-cloud link: at every proposal the drafts sent up are the drafting engine's greedy chain
    from a fresh prefill (drafted in the cycle, or ahead while the last verify was away), the answer is the
    target's, and one round trip per cycle crosses the link. EventGPT rarely gets a whole cycle right, so its
    drafts made ahead are mostly rewound; a perturbed copy of the target as the drafter often does, so both the
    drafts made ahead and the rewinds after them ran, and a whole cycle kept with another token than the guess."""
    vocab, link = 60, Link(rtt_ms=0.0, bandwidth_mbit_s=1e6)
    hits = misses = 0
    for seed in range(3):
        target, draft, prompt, engine, prefill, ids, reference = _target_and_reference(vocab, seed)
        copied = _noisy_copy(target, 0.3, seed)
        drafters = {"eventgpt": (draft, 5, functools.partial(_fresh_chain, draft, prompt, vocab, seed), vocab),
                    "target copy": (copied, 8, functools.partial(_fresh_chain, copied, prompt, vocab, seed, n_images=8,
                                                                 rows=vocab + 2), vocab + 2)}  # fmt: skip
        for name, (stages, n_images, fresh_chain, rows) in drafters.items():
            for k in (1, 3):
                engine.rewind(ids.shape[1])
                link.reset()
                edge = _CheckedEdge(fresh_chain, _prefilled(stages, n_images, prompt, 400, seed)[0], shared(rows, vocab),
                                    vocab + 2, Sampler(), link, True)  # fmt: skip
                result = decode_speculative(engine, prefill, edge, k, 24, EOS, Sampler())
                assert result.output_ids == reference, (seed, name, k)
                cycles = result.target_forwards
                assert edge.checked == cycles and edge.counts["ahead_cycles"] == cycles
                assert link.counts["link_messages_up"] == link.counts["link_messages_down"] == cycles
                assert link.counts["link_bytes_up"] == 4 * k * cycles
                hits += edge.counts["ahead_hits"]
                misses += edge.counts["ahead_cycles"] - edge.counts["ahead_hits"]
    assert hits >= 10 and misses >= 10, (hits, misses)


def test_a_links_delays_are_waited_for_and_what_crosses_it_is_counted():
    """A message of n bytes takes rtt / 2 + 8 n / bandwidth; waiting for it blocks until then, and a message whose
    time has passed (work done meanwhile hides it) costs nothing more."""
    import time

    link = Link(rtt_ms=20.0, bandwidth_mbit_s=8.0)  # 8 Mbit/s: 1000 bytes take 1 ms
    assert link.one_way_ms(1000) == pytest.approx(11.0)
    started = time.perf_counter()
    link.wait_until(link.send(1000, up=True))
    assert 11.0 <= (time.perf_counter() - started) * 1e3 < 16.0
    arrival = link.send(4, up=False)
    time.sleep(0.02)  # the edge worked longer than the trip
    started = time.perf_counter()
    link.wait_until(arrival)
    assert (time.perf_counter() - started) * 1e3 < 1.0
    assert link.counts == {"link_messages_up": 1, "link_bytes_up": 1000, "link_messages_down": 1, "link_bytes_down": 4}
    with pytest.raises(ValueError, match="bandwidth_mbit_s > 0"):
        Link(rtt_ms=1.0, bandwidth_mbit_s=0.0)


def test_a_swept_event_window_feeds_its_own_images_and_is_summarised_beside_the_drafts_own(tiny_pair_dir, tiny_data,
                                                                                          tmp_path, monkeypatch):  # fmt: skip
    """speculate on a swept window reads that window's images (event_images_25ms) for EventGPT and stays lossless;
    spec-summary sets its speedup, tau and alpha beside the main run's at the draft's own window; a window the
    data stage did not sweep is refused naming the manifest."""
    import evspec.speculative.run as run_module
    from evspec.errors import InputError
    from evspec.h5 import open_h5
    from evspec.models.processing import clip_preprocess
    from evspec.models.toy import load_pair
    from evspec.speculative.run import SpecSettings, speculate
    from evspec.speculative.summary import summarize

    pair = load_pair(tiny_pair_dir / "draft", tiny_pair_dir / "target", tiny_pair_dir / "draft_tokenizer",
                     tiny_pair_dir / "target_tokenizer")  # fmt: skip
    settings = dict(max_new_tokens=5, max_clips=2, split="train", methods=("target", "token"),
                    draft_lengths={"token": [2]})  # fmt: skip
    loaded, load_clip = [], run_module._load_clip

    def recorded(row, *args, **kwargs):
        loaded.append((row, load_clip(row, *args, **kwargs)))
        return loaded[-1][1]

    monkeypatch.setattr(run_module, "_load_clip", recorded)
    swept = speculate(pair, None, tiny_data, SpecSettings(**settings, event_window_ms=25), 0, 1, tmp_path / "w25")
    with open_h5(tiny_data / "tensors.h5") as handle:
        for row, clip in loaded:
            expected = clip_preprocess(handle["event_images_25ms"][row.tensor_index], clip.events.shape[-1])
            torch.testing.assert_close(clip.events, expected)
            assert not torch.equal(clip.events, clip_preprocess(handle["event_images"][row.tensor_index],
                                                                clip.events.shape[-1]))  # fmt: skip
    assert swept["token"]["exact_match"].all() and len(swept["token"]) == 2
    speculate(pair, None, tiny_data, SpecSettings(**settings), 0, 1, tmp_path / "own")
    summary = summarize(tmp_path / "own", tmp_path / "summary.json", tiny_data / "manifest.parquet",
                        window_dirs={25: tmp_path / "w25"})  # fmt: skip
    rows = {(e["window_ms"], e["own"]): e for e in summary["event_window_sweep"]}
    assert set(rows) == {(25, False), (50, True)}  # the tiny world's own window is the default 50 ms
    own = next(e for e in summary["methods"] if e["method"] == "token")
    assert rows[(50, True)]["speedup_median"] == own["speedup_median"] and rows[(50, True)]["tau"] == own["tau"]
    assert rows[(25, False)]["n_clips"] == 2 and rows[(25, False)]["exact_match_rate"] == 1.0
    with pytest.raises(InputError, match="n_events_10ms"):
        speculate(pair, None, tiny_data, SpecSettings(**settings, event_window_ms=10), 0, 1, tmp_path / "w10")


def test_a_swept_tree_shape_runs_the_tree_methods_there_and_is_summarised_beside_the_own(tiny_pair_dir, tiny_data,
                                                                                         tmp_path):  # fmt: skip
    """speculate at another (top-k, nodes) proposes trees of that shape and stays lossless; spec-summary sets its
    speedup, tau and alpha beside the main run's own shape (a wider tree drafts more per cycle)."""
    from evspec.models.toy import load_pair
    from evspec.speculative.run import SpecSettings, speculate
    from evspec.speculative.summary import summarize

    pair = load_pair(tiny_pair_dir / "draft", tiny_pair_dir / "target", tiny_pair_dir / "draft_tokenizer",
                     tiny_pair_dir / "target_tokenizer")  # fmt: skip
    settings = dict(max_new_tokens=6, max_clips=2, split="train", methods=("target", "token-tree"),
                    draft_lengths={"token-tree": [2]})  # fmt: skip
    speculate(pair, None, tiny_data, SpecSettings(**settings, tree_top_k=1, tree_nodes=2), 0, 1, tmp_path / "own")
    wide = speculate(pair, None, tiny_data, SpecSettings(**settings, tree_top_k=3, tree_nodes=6), 0, 1, tmp_path / "w")
    assert wide["token-tree"]["exact_match"].all()
    summary = summarize(tmp_path / "own", tmp_path / "summary.json", tiny_data / "manifest.parquet",
                        tree_dirs={(3, 6): tmp_path / "w"}, tree_shape=(1, 2))  # fmt: skip
    rows = {(e["tree_top_k"], e["tree_nodes"], e["own"]): e for e in summary["tree_sweep"]}
    assert set(rows) == {(1, 2, True), (3, 6, False)}
    own = next(e for e in summary["methods"] if e["method"] == "token-tree")
    assert rows[(1, 2, True)]["drafted"] == own["drafted"] and rows[(3, 6, False)]["exact_match_rate"] == 1.0
    assert rows[(3, 6, False)]["drafted"] > rows[(1, 2, True)]["drafted"]  # a chain of 2 against trees of 6


def test_over_edge_cloud_links_the_methods_stay_lossless_wait_their_round_trips_and_get_a_break_even(
        tiny_pair_dir, tiny_data, tmp_path):  # fmt: skip
    """speculate over a link: `token` waits a round trip per cycle and `feature` sends its event tokens up once (their
    bytes counted), every answer still the target's; spec-summary sets each round trip's speedup beside the main run
    (round trip 0) and finds where it falls to 1; methods a link does not carry are refused."""
    from evspec.adapter.modules import DraftHead, HeadConfig
    from evspec.models.toy import load_pair
    from evspec.speculative.run import SpecSettings, speculate
    from evspec.speculative.summary import break_even, summarize

    pair = load_pair(tiny_pair_dir / "draft", tiny_pair_dir / "target", tiny_pair_dir / "draft_tokenizer",
                     tiny_pair_dir / "target_tokenizer")  # fmt: skip
    torch.manual_seed(0)
    head = DraftHead(HeadConfig(hidden_size=32, event_size=32, n_heads=2, intermediate_size=32, adapter_hidden_size=16))
    settings = dict(max_new_tokens=6, max_clips=2, split="train", methods=("target", "token", "feature"),
                    draft_lengths={"token": [2], "feature": [2]})  # fmt: skip
    speculate(pair, head, tiny_data, SpecSettings(**settings), 0, 1, tmp_path / "own")
    rtt_ms = 40
    frames = speculate(pair, head, tiny_data, SpecSettings(**settings, link_rtt_ms=rtt_ms), 0, 1, tmp_path / "link")
    token, feature, target = frames["token"], frames["feature"], frames["target"]
    for rows in (token, feature):
        assert rows["exact_match"].all() and (rows["link_rtt_ms"] == rtt_ms).all()
    cycles = token["target_forwards"] - 1
    assert (token["link_messages_up"] == cycles).all() and (token["link_messages_down"] == cycles + 1).all()
    assert (token["total_ms"] >= (cycles + 0.5) * rtt_ms).all()  # the first token down, then a round trip a cycle
    assert (target["total_ms"] >= rtt_ms / 2).all() and (target["link_messages_down"] == target["new_tokens"]).all()
    hidden = pair.draft.config.hidden_size  # once, EventGPT's event tokens in float32
    assert (feature["link_messages_up"] == 1).all() and (feature["link_bytes_up"] % (hidden * 4) == 0).all()
    assert (feature["total_ms"] >= rtt_ms).all()  # the event tokens up, the answer down
    summary = summarize(tmp_path / "own", tmp_path / "summary.json", tiny_data / "manifest.parquet",
                        link_dirs={rtt_ms: tmp_path / "link"})  # fmt: skip
    rows = {(e["method"], e["rtt_ms"]): e for e in summary["link_sweep"]}
    assert set(rows) == {("token", 0), ("token", rtt_ms), ("feature", 0), ("feature", rtt_ms)}
    assert rows[("token", 0)]["own"] and rows[("token", 0)]["link"] is None
    assert rows[("token", rtt_ms)]["link"]["link_bytes_up"] == float(token["link_bytes_up"].median())
    assert rows[("token", rtt_ms)]["exact_match_rate"] == 1.0
    assert {(e["method"], e["k"]) for e in summary["link_break_even"]} == {("token", 2), ("feature", 2)}
    sweep = [{"method": "token", "k": 4, "rtt_ms": rtt, "own": False, "speedup_median": speedup}
             for rtt, speedup in ((1, 1.4), (10, 1.2), (50, 0.8))]  # fmt: skip
    assert break_even(sweep)[0]["break_even_rtt_ms"] == pytest.approx(30.0)
    assert break_even(sweep[:2])[0] | {"swept_rtt_ms": None} == {
        "method": "token", "k": 4, "break_even_rtt_ms": None, "swept_rtt_ms": None, "faster_at_rtt_ms": [1, 10]}
    with pytest.raises(ValueError, match=r"over an edge-cloud link only .* not \['cascade'\]"):
        SpecSettings(**{**settings, "methods": ("target", "cascade"), "draft_lengths": {"cascade": [2]}}, link_rtt_ms=5)
