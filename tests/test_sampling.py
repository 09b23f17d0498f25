"""Speculative sampling draws every answer token from the target's own law, at every draft position.

The reference law is independent of the engine: transformers' LLaMA forward over the sampled
prefix, warped by transformers' own logits processors (temperature, top-k, top-p). For each
answer position i, the tokens drawn there are compared with the expected counts
E[v] = sum over draws of p(v | that draw's prefix) by Pearson's statistic (the increments are
martingale differences, so the test is valid, if conservative, although prefixes differ), and
the first k + 1 tokens are compared with their exact joint law, every prefix enumerated. Answers
are longer than k + 1 and span several cycles, so every draft position, the residual after a
rejection and the bonus after a full acceptance all reach the output; each test checks that
both paths ran, and its negative control (acceptance replaced by "keep every draft") must fail.

The vocabularies mirror the real pair: the target has 8 ids, the draft 7; ids 0..5 are shared,
id 6 means different tokens to the two (as 32000 is `<ev_patch>` / `<image>`), id 7 is the
target's alone. The draft never proposes 6; the target reaches 6 and 7 through residual and bonus.
"""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.stats import chi2
from transformers import LlamaConfig, LlamaModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import evspec.speculative.decode as decode_module
from evspec.adapter.modules import DraftHead, HeadConfig
from evspec.models.configs import small_text_config
from evspec.models.tokenizer import SharedVocabulary
from evspec.speculative.decode import decode_speculative, decode_speculative_tree
from evspec.engine.head import HeadEngine
from evspec.speculative.drafters import (CascadeDrafter, EdgeTokenDrafter, HybridDrafter, PrefetchedDrafter, TokenDrafter,
                                         TokenTreeDrafter)
from evspec.speculative.link import Link
from evspec.engine.llama import LlamaEngine
from evspec.speculative.sampling import Sampler, SamplingSpec

TARGET_VOCAB, DRAFT_VOCAB, N_SHARED = 8, 7, 6
PROMPT_LENGTH = 6


def _transformers_warpers(spec: SamplingSpec) -> LogitsProcessorList:
    warpers = LogitsProcessorList([TemperatureLogitsWarper(spec.temperature)])
    if spec.top_k:
        warpers.append(TopKLogitsWarper(spec.top_k))
    if spec.top_p < 1:
        warpers.append(TopPLogitsWarper(spec.top_p))
    return warpers


@pytest.mark.parametrize("spec", [SamplingSpec(0.7), SamplingSpec(1.3, top_k=3), SamplingSpec(0.9, top_p=0.8),
                                  SamplingSpec(1.0, top_k=4, top_p=0.6), SamplingSpec(0.5, top_p=0.999)])
def test_sampling_spec_equals_transformers_warpers(spec):
    logits = torch.randn(64, 50) * 3
    logits[:, :5] = 2.0  # ties at the top-k boundary
    expected = _transformers_warpers(spec)(None, logits.clone())
    torch.testing.assert_close(spec.warp(logits), expected)


class Pair:
    """A target LLaMA and a draft made from it with perturbed weights, both with a prompt prefilled."""

    def __init__(self, seed: int, noise: float, head_std: float, device: str = "cpu") -> None:
        torch.manual_seed(seed)
        self.device = device
        self.target = LlamaModel(LlamaConfig(**small_text_config(TARGET_VOCAB))).eval()
        self.target_head = torch.nn.Linear(32, TARGET_VOCAB, bias=False)
        torch.nn.init.normal_(self.target_head.weight, std=head_std)  # peaked, position-dependent distributions
        self.draft = copy.deepcopy(self.target)
        with torch.no_grad():
            for parameter in self.draft.parameters():
                parameter.add_(noise * parameter.std() * torch.randn_like(parameter))
        self.draft_head = torch.nn.Linear(32, DRAFT_VOCAB, bias=False)
        self.draft_head.weight.data = self.target_head.weight.data[:DRAFT_VOCAB] * (1 + noise * torch.randn(DRAFT_VOCAB, 32))
        self.prompt = torch.randn(1, PROMPT_LENGTH, 32)
        self.vocabulary = SharedVocabulary(torch.arange(DRAFT_VOCAB) < N_SHARED, unknown_id=0)
        for module in (self.target, self.target_head, self.draft, self.draft_head):
            module.to(device)
        self.prompt = self.prompt.to(device)

    def engines(self):
        target = LlamaEngine(self.target, self.target_head, 64)
        draft = LlamaEngine(self.draft, self.draft_head, 64)
        return target, target.prefill(self.prompt), draft, draft.prefill(self.prompt)

    @torch.no_grad()
    def reference_probabilities(self, answers: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
        """p(. | prompt, answer[:i]) for every draw and position: [draws, n, V], transformers throughout."""
        answers = answers.to(self.device)
        draws, n = answers.shape
        embeds = torch.cat([self.prompt.expand(draws, -1, -1), self.target.embed_tokens(answers[:, :-1])], dim=1)
        logits = self.target_head(self.target(inputs_embeds=embeds).last_hidden_state[:, PROMPT_LENGTH - 1 :])
        flat = _transformers_warpers(spec)(None, logits.reshape(draws * n, -1).float())
        return flat.softmax(-1).view(draws, n, -1).cpu()


def _drafter(kind: str, pair: Pair, draft, draft_prefill, target_engine, k: int, sampler: Sampler):
    if kind == "token":
        return TokenDrafter(draft, pair.vocabulary, TARGET_VOCAB, sampler)
    if kind == "cascade":
        return CascadeDrafter(draft, pair.vocabulary, TARGET_VOCAB, sampler)
    if kind == "edge":  # over a link with no delay: the drafts made ahead while a verify is away are what differs
        return EdgeTokenDrafter(draft, pair.vocabulary, TARGET_VOCAB, sampler, Link(0.0, 1e6), ahead=True)
    if kind == "prefetched":
        return PrefetchedDrafter.draft_ahead(draft, draft_prefill.logits, k, pair.vocabulary, TARGET_VOCAB, sampler)
    torch.manual_seed(3)
    draft_vocab = torch.tensor([0, 1, 2, 3, 4, 6]) if kind == "head-draft-vocab" else None  # the others: never proposed
    head = DraftHead(HeadConfig(hidden_size=32, event_size=32, n_heads=2, intermediate_size=32, adapter_hidden_size=16,
                                draft_vocab_size=None if draft_vocab is None else len(draft_vocab)))  # fmt: skip
    if draft_vocab is not None:
        head.set_draft_vocab(draft_vocab)
    engine = HeadEngine(head.eval().to(pair.device), pair.target.embed_tokens, pair.target_head, 5, 64, k, sampler)
    engine.load_events(torch.randn(5, 32))
    return engine


def _draw(kind: str, k: int, spec: SamplingSpec, n_tokens: int, draws: int, seed: int = 0, noise: float = 0.1,
          head_std: float = 0.7, device: str = "cpu", tree: tuple[int, int] = (3, 6)):
    """`draws` answers of n_tokens, their cycle counts, and the reference law along them. Kind "token-tree":
    EventGPT's EAGLE-2 tree of depth k with `tree` = (top_k, nodes), verified by `decode_speculative_tree`;
    "hybrid": EventGPT's chain and the head's chain of k as one tree (`HybridDrafter`), verified the same way."""
    pair = Pair(seed=3, noise=noise, head_std=head_std, device=device)  # a first token the draft can guess
    target_sampler = Sampler(spec, torch.Generator(device).manual_seed(seed))
    draft_sampler = Sampler(spec, torch.Generator(device).manual_seed(seed + 1))
    target, target_prefill, draft, draft_prefill = pair.engines()
    answers, cycles, full, ids_not_shared, prefetched, guesses_kept, guesses_rejected, ahead = [], 0, 0, 0, 0, 0, 0, 0
    for _ in range(draws):
        target.rewind(PROMPT_LENGTH)
        draft.rewind(PROMPT_LENGTH)
        if kind in ("token-tree", "hybrid"):
            drafter = TokenTreeDrafter(draft, pair.vocabulary, draft_sampler, k, *tree) if kind == "token-tree" else \
                HybridDrafter(TokenDrafter(draft, pair.vocabulary, TARGET_VOCAB, draft_sampler),
                              _drafter("head", pair, draft, draft_prefill, target, k, target_sampler), k)  # fmt: skip
            result = decode_speculative_tree(target, target_prefill, drafter, k, n_tokens, None, target_sampler)
        else:
            drafter = _drafter(kind, pair, draft, draft_prefill, target, k, draft_sampler)
            result = decode_speculative(target, target_prefill, drafter, k, n_tokens, None, target_sampler)
        assert len(result.output_ids) == n_tokens
        answers.append(result.output_ids)
        prefetched += kind == "prefetched" and int(drafter.guesses[0]) == result.output_ids[0]
        ahead += drafter.counts["ahead_hits"] if kind == "edge" else 0
        if kind == "cascade":
            guesses_kept += drafter.counts["lookup_accepted"]
            guesses_rejected += drafter.counts["lookup_drafted"] - drafter.counts["lookup_accepted"]
        cycles += result.target_forwards
        full += result.accepted_per_position[-1]
        ids_not_shared += sum(token >= N_SHARED for token in result.output_ids)
    answers = torch.tensor(answers)
    paths = {"bonus": full, "residual": cycles - full, "ids the draft cannot propose": ids_not_shared,
             "drafts made ahead": prefetched, "lookup guesses kept": guesses_kept,
             "lookup guesses rejected": guesses_rejected, "drafts made ahead of a verify": ahead}  # fmt: skip
    return answers, pair.reference_probabilities(answers, spec), paths, pair


def _pearson_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's goodness of fit, the least likely cells merged until their expectation reaches 5."""
    observed, expected = observed.double(), expected.double()
    order = torch.argsort(expected)
    merged = int(torch.searchsorted(expected[order].cumsum(0), torch.tensor(5.0, dtype=torch.float64))) + 1
    small, large = order[:merged], order[merged:]
    observed = torch.cat([observed[large], observed[small].sum()[None]])
    expected = torch.cat([expected[large], expected[small].sum()[None]])
    if len(expected) < 2:
        return 1.0
    return float(chi2.sf(float(((observed - expected) ** 2 / expected).sum()), len(expected) - 1))


def _p_value(answers: torch.Tensor, reference: torch.Tensor, pair: Pair, spec: SamplingSpec, k: int) -> float:
    """Bonferroni over two kinds of test: each position's tokens against the expected counts
    E[v] = sum over draws of p(v | that draw's prefix), and the exact joint law of the first k + 1
    tokens (every prefix enumerated), which sees how the positions of the first cycle depend on each other."""
    n_tokens = answers.shape[1]
    p_values = [_pearson_p_value(torch.bincount(answers[:, i], minlength=TARGET_VOCAB), reference[:, i].sum(0))
                for i in range(n_tokens)]  # fmt: skip
    m = k + 1
    sequences = torch.cartesian_prod(*[torch.arange(TARGET_VOCAB)] * m).view(-1, m)  # every first cycle: [V^m, m]
    conditional = pair.reference_probabilities(sequences, spec)  # [V^m, m, V]
    joint = conditional.gather(-1, sequences[..., None])[..., 0].prod(-1)  # [V^m]
    index = (answers[:, :m] * TARGET_VOCAB ** torch.arange(m - 1, -1, -1)).sum(-1)  # row of each draw's first cycle
    p_values.append(_pearson_p_value(torch.bincount(index, minlength=len(joint)), joint * len(answers)))
    return min(1.0, len(p_values) * min(p_values))


def _accept_every_draft(logits, draft_ids, draft_probs, sampler):
    """Negative control: no acceptance test at all, the bonus from the target's row after the drafts."""
    k = len(draft_ids)
    return k, int(sampler.draw(sampler.probabilities(logits)[k]))


CASES = [  # (drafter, k, spec): k up to 4, temperatures other than 1, top-k and top-p, every drafter
    ("token", 4, SamplingSpec(0.9, top_p=0.7)),
    ("token", 2, SamplingSpec(1.5, top_k=4)),
    ("token", 1, SamplingSpec(0.6)),
    ("head", 2, SamplingSpec(2.0, top_p=0.95)),
    ("head-draft-vocab", 2, SamplingSpec(2.0, top_k=6)),
    ("prefetched", 4, SamplingSpec(0.8, top_p=0.8)),
    ("cascade", 4, SamplingSpec(1.1, top_k=5)),
    ("edge", 2, SamplingSpec(0.7, top_k=8)),
]


@pytest.mark.parametrize("kind, k, spec", CASES, ids=[f"{c[0]}-k{c[1]}" for c in CASES])
def test_speculative_sampling_follows_the_target_law_at_every_position(kind, k, spec, monkeypatch, device="cpu"):
    n_tokens = 2 * k + 3  # several cycles: every draft position and the bonus reach the output
    answers, reference, paths, pair = _draw(kind, k, spec, n_tokens, draws=400, device=device)
    own_paths = {"drafts made ahead": "prefetched", "lookup guesses kept": "cascade", "lookup guesses rejected": "cascade",
                 "drafts made ahead of a verify": "edge"}  # fmt: skip
    for path, count in paths.items():  # each path ran often enough to matter: the bonus after k acceptances,
        if own_paths.get(path, kind) == kind:  # the residual after a rejection, target-only ids, the drafter's own
            assert count >= 30, f"{path}: {count} times"
    assert _p_value(answers, reference, pair, spec, k) > 1e-3
    monkeypatch.setattr(decode_module, "_accept", _accept_every_draft)
    control, control_reference, *_ = _draw(kind, k, spec, n_tokens, draws=200, device=device)
    assert _p_value(control, control_reference, pair, spec, k) < 1e-4, "the test must tell a wrong law apart"


def _keep_first_children(logits, ids, parents, children, sampler):
    """Negative control for trees: no acceptance test, down the first children to a leaf, then the target's token."""
    path = [0]
    while children[path[-1]]:
        path.append(children[path[-1]][0])
    kept = [int(ids[node]) for node in path[1:]]
    return path, kept + [int(sampler.draw(sampler.probabilities(logits[path[-1]])))]


TREE_CASES = [  # (kind, depth, spec, (top_k, nodes), (draft noise, target head std)): flatter targets than the
    ("token-tree", 2, SamplingSpec(0.9, top_p=0.8), (3, 6), (0.3, 0.25)),  # chains' tests, so that later siblings
    ("token-tree", 3, SamplingSpec(1.3, top_k=5), (2, 7), (0.2, 0.35)),  # are often kept
    ("hybrid", 2, SamplingSpec(1.2, top_p=0.9), (0, 0), (0.3, 0.25)),
]


@pytest.mark.parametrize("kind, depth, spec, tree, pair_shape", TREE_CASES,
                         ids=[f"{c[0]}-depth{c[1]}-top{c[3][0]}" for c in TREE_CASES])  # fmt: skip
def test_tree_sampling_follows_the_target_law_at_every_position(kind, depth, spec, tree, pair_shape, monkeypatch,
                                                                device="cpu"):  # fmt: skip
    """EventGPT's draft tree (or the hybrid's two chains as one tree) verified by recursive rejection over
    siblings: every answer position and the first
    depth + 1 tokens jointly follow the target's law. Every way down the tree ran often enough to matter: a first
    child kept, a later sibling kept after the ones before it were rejected, every child rejected (the
    target's token from what is left) and a leaf reached (its bonus), and ids the draft cannot propose.
    Control: keeping the first child at every level without a test must fail."""
    ways = {"first child kept": 0, "later sibling kept": 0, "every child rejected": 0, "leaf reached": 0}
    accept_tree = decode_module._accept_tree

    def recorded(logits, ids, parents, children, sampler):
        path, kept = accept_tree(logits, ids, parents, children, sampler)
        for parent, node in zip(path, path[1:]):
            ways["first child kept" if children[parent][0] == node else "later sibling kept"] += 1
        ways["every child rejected" if children[path[-1]] else "leaf reached"] += 1
        return path, kept

    monkeypatch.setattr(decode_module, "_accept_tree", recorded)
    n_tokens = 2 * depth + 3
    noise, head_std = pair_shape
    answers, reference, paths, pair = _draw(kind, depth, spec, n_tokens, 400, noise=noise, head_std=head_std,
                                            device=device, tree=tree)  # fmt: skip
    ways["ids the draft cannot propose"] = paths["ids the draft cannot propose"]
    for way, count in ways.items():
        assert count >= 30, f"{way}: {count} times"
    assert _p_value(answers, reference, pair, spec, depth) > 1e-3
    monkeypatch.setattr(decode_module, "_accept_tree", _keep_first_children)
    control, control_reference, *_ = _draw(kind, depth, spec, n_tokens, 200, noise=noise, head_std=head_std,
                                           device=device, tree=tree)  # fmt: skip
    assert _p_value(control, control_reference, pair, spec, depth) < 1e-4, "the test must tell a wrong law apart"


def _proposals(kind: str, spec: SamplingSpec, k: int, draws: int):
    """`draws` proposals of k drafts from the same committed state: ids [draws, k] and their q [draws, k, V]."""
    pair = Pair(seed=3, noise=0.1, head_std=0.7)
    target, target_prefill, draft, draft_prefill = pair.engines()
    sampler = Sampler(spec, torch.Generator().manual_seed(5))
    ids, q = [], []
    for _ in range(draws):
        draft.rewind(PROMPT_LENGTH)
        drafter = _drafter(kind, pair, draft, draft_prefill, target, k, sampler)
        first = int(drafter.guesses[0]) if kind == "prefetched" else 3  # prefetched: its drafts made ahead are used
        drafter.start(first, target_prefill.hidden[0, -1])
        proposed, probabilities = drafter.propose(k)
        if kind == "edge":  # every draft kept and the target's token its guess: the drafts made ahead are proposed
            drafter.commit([*proposed.tolist(), int(drafter.drafted_ahead[0])], target_prefill.hidden[0, -1:])
            proposed, probabilities = drafter.propose(k)
            assert drafter.counts["ahead_hits"] == 1
        ids.append(proposed)
        q.append(probabilities)
    return torch.stack(ids), torch.stack(q)


@pytest.mark.parametrize("kind", ["token", "head", "head-draft-vocab", "prefetched", "edge"])
@pytest.mark.parametrize("spec", [SamplingSpec(0.5), SamplingSpec(1.5, top_p=0.8)], ids=["t0.5", "t1.5-p0.8"])
def test_each_drafter_returns_the_distribution_its_drafts_were_drawn_from(kind, spec):
    """The acceptance rule is only as right as q: at every draft position the drafted ids must follow the q
    the drafter returned (observed counts against the summed q rows). Control: drafts drawn at a
    temperature four times as high, against the q of this one (position 1, whose context every proposal shares)."""
    k = 3
    ids, q = _proposals(kind, spec, k, draws=300)
    p_values = [_pearson_p_value(torch.bincount(ids[:, i], minlength=TARGET_VOCAB), q[:, i].sum(0)) for i in range(k)]
    assert min(p_values) * k > 1e-3
    hotter, _ = _proposals(kind, SamplingSpec(spec.temperature * 4, spec.top_k, spec.top_p), k, draws=300)
    assert _pearson_p_value(torch.bincount(hotter[:, 0], minlength=TARGET_VOCAB), q[:, 0].sum(0)) < 1e-4
