"""EventGPT as a drafter (`token`, `prefill`, trees); the draft head's drafter is its engine (`evspec.engine.head`);
both at once (`hybrid`); EventGPT drafting faster behind prompt lookup (`cascade`); EventGPT on an edge device
across a link from the target (`EdgeTokenDrafter`).

Each holds its own `Sampler` (the run's sampling spec, a random stream on its device) and
returns, when sampling, the distribution q each draft was drawn from, over the target's
ids, so the acceptance test reads exactly the law the drafts came from. EventGPT proposes
only ids the two tokenizers share (`SharedVocabulary`).
"""

from __future__ import annotations

import torch

from evspec.models.tokenizer import SharedVocabulary
from evspec.engine.kernels import host_to_device
from evspec.engine.head import HeadEngine
from evspec.engine.llama import LlamaEngine
from evspec.speculative.link import TOKEN_BYTES, Link, tensor_bytes
from evspec.speculative.names import AHEAD_COUNTS, CASCADE_COUNTS
from evspec.speculative.sampling import Sampler
from evspec.speculative.trees import best_nodes, expand_level


def _stacked(ids: list[torch.Tensor], probs: list[torch.Tensor | None]):
    return torch.stack(ids).view(-1), (torch.stack(probs).view(len(ids), -1) if probs[0] is not None else None)


class TokenDrafter:
    """EventGPT drafts autoregressively on its own fast engine (its prompt already prefilled).

    Its cache holds every committed token except those in `pending`, which the next
    proposal feeds first (the bonus token, and the last draft when all k were accepted).
    """

    def __init__(self, draft: LlamaEngine, vocabulary: SharedVocabulary, target_vocab: int, sampler: Sampler) -> None:
        self.draft, self.vocabulary, self.target_vocab, self.sampler = draft, vocabulary, target_vocab, sampler
        self.allowed = vocabulary.draft_mask_on(draft.device)
        self.pending: list[int] = []

    def start(self, first_token: int, first_hidden: torch.Tensor) -> None:
        self.pending = [first_token]

    def propose(self, k: int):
        out = self.draft.step(host_to_device([self.vocabulary.readable(self.pending)], self.draft.device))
        self.base = self.draft.length
        ids, probs = [], []
        for position in range(k):
            token, q = self.sampler.propose(out.logits[0, -1], self.allowed, self.target_vocab)
            ids.append(token)
            probs.append(q)
            if position < k - 1:
                out = self.draft.step(token.view(1, 1))
        self.proposed = ids
        return _stacked(ids, probs)

    def commit(self, tokens: list[int], hidden: torch.Tensor) -> None:
        self.keep(len(tokens) - 1, tokens)  # its chain was verified: the kept tokens are its accepted drafts + one

    def keep(self, matched: int, tokens: list[int]) -> None:
        """The target kept `tokens`, of which the first `matched` are this drafter's first drafts: keep those
        it has fed (drafts 1..k-1) in its cache; the rest of `tokens` are pending."""
        fed = min(matched, len(self.proposed) - 1)
        self.draft.rewind(self.base + fed)
        self.pending = tokens[fed:]


def lookup_continuation(history: list[int], max_tokens: int, max_ngram: int = 3) -> list[int]:
    """Prompt lookup (Saxena, 2023): the tokens that followed the latest earlier occurrence of the longest suffix
    of `history` (of `max_ngram` tokens down to 1), at most `max_tokens` of them; [] when no suffix recurs."""
    if max_tokens < 1:
        return []
    for n in range(min(max_ngram, len(history) - 1), 0, -1):
        suffix = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):  # the latest occurrence with a token after it
            if history[start : start + n] == suffix:
                return history[start + n : start + n + max_tokens]
    return []


class CascadeDrafter(TokenDrafter):
    """`cascade`: a free drafter in front of EventGPT. Prompt lookup over the answer so far guesses EventGPT's
    next drafts; EventGPT reads the guesses in the same forward as the token it must read anyway, and each of
    its drafts comes from its own law at that position exactly as `TokenDrafter` draws it (greedy: its argmax).
    A guess equal to the draft means the next position's logits are already computed, so one forward can yield
    several drafts; the first guess that differs and the ones after it are rewound. The drafts, and so what the
    target verifies, are EventGPT's own: only the number of EventGPT forwards changes.

    `counts`: guesses proposed to EventGPT and kept (`lookup_*`, the first stage), EventGPT's forwards and
    drafts (`eventgpt_*`; drafts per forward is the first stage's yield); the target's acceptance of EventGPT's
    drafts is the second stage (the usual counts).
    """

    def __init__(self, draft: LlamaEngine, vocabulary: SharedVocabulary, target_vocab: int, sampler: Sampler,
                 max_ngram: int = 3) -> None:  # fmt: skip
        super().__init__(draft, vocabulary, target_vocab, sampler)
        self.max_ngram = max_ngram
        self.counts = dict.fromkeys(CASCADE_COUNTS, 0)

    def start(self, first_token: int, first_hidden: torch.Tensor) -> None:
        super().start(first_token, first_hidden)
        self.history = [first_token]  # the committed answer, where the lookup searches

    def propose(self, k: int):
        feed, ids, probs = self.pending, [], []
        self.base = self.draft.length + len(feed)  # as TokenDrafter's: the cache once the pending tokens are read
        while len(ids) < k:
            guesses = lookup_continuation(self.history + ids, k - 1 - len(ids), self.max_ngram)
            out = self.draft.step(host_to_device([self.vocabulary.readable(feed + guesses)], self.draft.device))
            rows = out.logits[0, len(feed) - 1 :]  # the laws of the next draft and of one after each guess
            tokens, q = self.sampler.propose(rows, self.allowed, self.target_vocab)
            drawn = tokens.tolist()
            kept = next((i for i, (a, b) in enumerate(zip(drawn, guesses)) if a != b), len(guesses))
            ids += drawn[: kept + 1]  # the guesses it drew itself, and its next draft
            if q is not None:
                probs.append(q[: kept + 1])
            self.counts["lookup_drafted"] += len(guesses)
            self.counts["lookup_accepted"] += kept
            self.counts["eventgpt_forwards"] += 1
            self.draft.rewind(self.base + len(ids) - 1)  # it has read every draft but the last
            feed = ids[-1:]
        self.counts["eventgpt_drafts"] += k
        self.proposed = ids
        return torch.tensor(ids, device=self.draft.device), (torch.cat(probs) if probs else None)

    def keep(self, matched: int, tokens: list[int]) -> None:
        super().keep(matched, tokens)
        self.history += tokens


class EdgeTokenDrafter(TokenDrafter):
    """`token` over an edge-cloud link (`evspec.speculative.link`): EventGPT on the edge, the target in the cloud.
    Each cycle the drafts go up (ids, and the laws q when sampling) and the kept tokens come down.

    With `ahead`, EventGPT drafts on while they are away: it reads its last draft, takes its own next token g0
    as its guess of the target's, and drafts g1..gk after g0. When the target keeps all k drafts and its own
    token is g0, then g1..gk (with their q) are exactly what this drafter would propose next, since EventGPT's
    draws do not depend on the target's (as `PrefetchedDrafter`'s), so they go up at once; otherwise the cache
    is rewound past them. The drafts cross as host copies, so the target's verify never waits for the drafting
    queued behind them on the edge's device.
    """

    def __init__(self, draft: LlamaEngine, vocabulary: SharedVocabulary, target_vocab: int, sampler: Sampler,
                 link: Link, ahead: bool) -> None:  # fmt: skip
        super().__init__(draft, vocabulary, target_vocab, sampler)
        self.link, self.ahead = link, ahead
        self.counts = dict.fromkeys(AHEAD_COUNTS, 0)
        self.drafted_ahead: tuple | None = None  # (g0, g1..gk, their q, the cache length after g0)
        self.next_proposal: tuple | None = None  # the drafts of the coming cycle, when they were drafted ahead

    def propose(self, k: int):
        if self.next_proposal is not None:
            ids, probs = self.next_proposal
            self.next_proposal = None
            self.counts["ahead_hits"] += 1
        else:
            ids, probs = super().propose(k)
        arrival = self.link.send(len(ids) * TOKEN_BYTES + tensor_bytes(probs), up=True, ready=ids)
        sent = ids.cpu(), None if probs is None else probs.cpu()  # what the cloud receives
        if self.ahead:
            self._draft_ahead(ids, k)  # queued behind the send: the edge works while the drafts are away
        self.link.wait_until(arrival)
        return sent

    def _draft_ahead(self, ids: torch.Tensor, k: int) -> None:
        """Read dk, draw g0, read g0, draw g1..gk (k + 1 steps, no host read); the cache then holds dk..g(k-1)."""
        out = self.draft.step(ids[-1].view(1, 1))
        guess, _ = self.sampler.propose(out.logits[0, -1], self.allowed, self.target_vocab)
        token, ahead_ids, ahead_probs = guess, [], []
        for _ in range(k):
            out = self.draft.step(token.view(1, 1))
            token, q = self.sampler.propose(out.logits[0, -1], self.allowed, self.target_vocab)
            ahead_ids.append(token)
            ahead_probs.append(q)
        self.drafted_ahead = (guess, *_stacked(ahead_ids, ahead_probs), self.draft.length - k + 1)
        self.counts["ahead_cycles"] += 1

    def keep(self, matched: int, tokens: list[int]) -> None:
        self.link.wait_until(self.link.send(len(tokens) * TOKEN_BYTES, up=False))  # the kept tokens come down
        ahead, self.drafted_ahead = self.drafted_ahead, None
        if ahead is not None and matched == len(self.proposed) and tokens[-1] == int(ahead[0]):
            _, ids, probs, self.base = ahead  # as if it had read [dk, g0] and proposed g1..gk now
            self.proposed, self.pending, self.next_proposal = list(ids), [], (ids, probs)
        else:
            super().keep(matched, tokens)


class TokenTreeDrafter:
    """EventGPT drafts a tree (EAGLE-2's dynamic tree): `depth` levels, each the `top_k` children of
    the level before with the highest cumulative draft log-probability, grown level by level on the
    draft's own engine (`LlamaEngine.step_tree(grow=True)`); then the `nodes` best of all, by the same
    score, are proposed. A child's score is below its parent's, so the best `nodes` include their
    ancestors. Its cache holds the committed tokens except `pending`, as `TokenDrafter`'s.

    Under sampling the scores are the draft's warped log-probabilities and the tree stays a deterministic
    function of them: its drafts are point masses, which recursive rejection verifies exactly
    (`evspec.speculative.decode._accept_tree`).
    """

    def __init__(self, draft: LlamaEngine, vocabulary: SharedVocabulary, sampler: Sampler, depth: int, top_k: int,
                 nodes: int) -> None:  # fmt: skip
        if min(depth, top_k, nodes) < 1:
            raise ValueError(f"depth {depth}, top_k {top_k} and nodes {nodes} must be positive")
        self.draft, self.vocabulary, self.sampler = draft, vocabulary, sampler
        self.depth, self.top_k, self.nodes = depth, top_k, nodes
        self.allowed = vocabulary.draft_mask_on(draft.device)
        self.pending: list[int] = []

    def start(self, first_token: int, first_hidden: torch.Tensor) -> None:
        self.pending = [first_token]

    def _log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The draft's log-probabilities over the shared ids, warped by the sampling spec when sampling (ids
        the spec removes score -inf and are never proposed)."""
        return self.sampler.tree_scores(logits.float().masked_fill(~self.allowed, float("-inf")))

    def propose_tree(self) -> tuple[torch.Tensor, list[int]]:
        out = self.draft.step(host_to_device([self.vocabulary.readable(self.pending)], self.draft.device))
        self.base = self.draft.length
        tokens, parents, scores = [], [], []  # the candidates, level by level
        self.fed: dict[int, int] = {}  # candidate -> its index in the draft's tree (the candidates it has read)
        layer, level_scores = [-1], self._log_probs(out.logits[0, -1:])  # children of the last committed token
        for level in range(self.depth):
            if level:  # the draft reads the level before (growing its tree) for that level's children
                ids = host_to_device([[tokens[c] for c in layer]], self.draft.device)
                out = self.draft.step_tree(ids, [self.fed.get(parents[c], -1) for c in layer], grow=level > 1)
                self.fed.update({c: len(self.fed) for c in layer})
                cumulative = torch.tensor([scores[c] for c in layer], device=out.logits.device)[:, None]
                level_scores = cumulative + self._log_probs(out.logits[0])
            layer = expand_level(level_scores, layer, self.top_k, tokens, parents, scores)
            if not layer:
                break
        chosen = best_nodes(parents, scores, self.nodes)
        index = {c: i for i, c in enumerate(chosen)}
        self.tree = [(tokens[c], index.get(parents[c], -1), c) for c in chosen]  # (token, parent, candidate)
        return torch.tensor([t for t, _, _ in self.tree]), [p for _, p, _ in self.tree]

    def commit(self, tokens: list[int], hidden: torch.Tensor) -> None:
        """Keep the accepted drafts the draft has read (a path from its tree's root); the rest are pending."""
        node, path = -1, []
        for token in tokens[:-1]:  # the accepted drafts: one child per parent has a given token
            node = next(i for i, (t, p, _) in enumerate(self.tree) if p == node and t == token)
            path.append(self.tree[node][2])
        read = [self.fed[c] for c in path if c in self.fed]  # a prefix of the path: the draft reads parents first
        if read:
            self.draft.keep(read)
        else:
            self.draft.rewind(self.base)
        self.pending = tokens[len(read):]


class PrefetchedDrafter(TokenDrafter):
    """A TokenDrafter whose first k drafts were made before the target's first token was known.

    The draft drew its own first token g0 and drafted g1..gk after it (while the target was
    still encoding video and prefilling), keeping the distributions q1..qk they came from.
    If the target's first token is g0, g1..gk are exactly what a TokenDrafter would propose
    after it (the draft's draws are independent of the target's), so they are verified right
    away; otherwise they are dropped and the draft resumes from the target's token.
    """

    def __init__(self, draft: LlamaEngine, vocabulary: SharedVocabulary, target_vocab: int, sampler: Sampler,
                 prompt_length: int, guesses: torch.Tensor, guess_probs: torch.Tensor | None) -> None:  # fmt: skip
        super().__init__(draft, vocabulary, target_vocab, sampler)
        self.prompt_length = prompt_length
        self.guesses, self.guess_probs = guesses, guess_probs  # g0..gk; q1..qk; the cache holds g0..g(k-1)
        self.prefetched = False
        self.drafted: torch.cuda.Event | None = None  # recorded after the drafts, on the stream that made them

    @classmethod
    def draft_ahead(cls, draft: LlamaEngine, prefill_logits: torch.Tensor, k: int, vocabulary: SharedVocabulary,
                    target_vocab: int, sampler: Sampler) -> PrefetchedDrafter:  # fmt: skip
        """Draw g0..gk from the draft's prefill onward, without any host synchronisation."""
        prompt_length = draft.length
        allowed = vocabulary.draft_mask_on(draft.device)
        token, _ = sampler.propose(prefill_logits[0, -1], allowed, target_vocab)
        guesses, probs = [token], []
        for _ in range(k):
            token, q = sampler.propose(draft.step(token.view(1, 1)).logits[0, -1], allowed, target_vocab)
            guesses.append(token)
            probs.append(q)
        probs = torch.stack(probs) if probs[0] is not None else None
        drafter = cls(draft, vocabulary, target_vocab, sampler, prompt_length, torch.stack(guesses), probs)
        if draft.device.type == "cuda":  # the stream it drafted on (a side stream): whoever reads the drafts waits
            drafter.drafted = torch.cuda.current_stream(draft.device).record_event()
        return drafter

    def start(self, first_token: int, first_hidden: torch.Tensor) -> None:
        if self.drafted is not None:  # the first token is out: from here on, the target's stream needs the drafts
            torch.cuda.current_stream(self.draft.device).wait_event(self.drafted)
        self.prefetched = int(self.guesses[0]) == first_token
        if self.prefetched:
            self.base, self.proposed = self.prompt_length + 1, list(self.guesses[1:])
        else:
            self.draft.rewind(self.prompt_length)
            self.pending = [first_token]

    def propose(self, k: int):
        if not self.prefetched:
            return super().propose(k)
        if k != len(self.proposed):
            raise ValueError(f"drafted {len(self.proposed)} ahead but asked for {k}: draft ahead with the same k")
        self.prefetched = False
        return torch.stack(self.proposed), self.guess_probs


class HeadTreeDrafter:
    """The draft head drafting EAGLE-2 trees (`HeadEngine.draft_tree`): a `TreeDrafter` over the head engine."""

    def __init__(self, engine: HeadEngine, depth: int, top_k: int, nodes: int) -> None:
        if min(depth, top_k, nodes) < 1:
            raise ValueError(f"depth {depth}, top_k {top_k} and nodes {nodes} must be positive")
        self.engine, self.depth, self.top_k, self.nodes = engine, depth, top_k, nodes

    def start(self, first_token: int, first_hidden: torch.Tensor) -> None:
        self.engine.start(first_token, first_hidden)

    def propose_tree(self) -> tuple[torch.Tensor, list[int]]:
        return self.engine.draft_tree(self.depth, self.top_k, self.nodes)

    def commit(self, tokens: list[int], hidden: torch.Tensor) -> None:
        self.engine.commit(tokens, hidden)


class HybridDrafter:
    """EventGPT's chain of k (token level) and the draft head's chain of k (feature level) verified together,
    as the two branches of one tree (`hybrid`): the chains' common prefix is one path, and they split where
    they first differ. Either drafter's chain may be the one the target follows; EventGPT keeps in its cache
    only its own drafts on the kept path, the head caches the target's states whatever was kept.

    Under sampling each chain is drawn from its drafter's own law, independently of the target's draws, and
    the tree is verified by recursive rejection with point-mass drafts (`decode._accept_tree`), which keeps
    the target's law for any tree chosen so. `counts` holds the accepted drafts each drafter proposed
    (`accepted_from_eventgpt`, `accepted_from_head`; a draft both proposed counts for both).
    """

    SOURCES = ("eventgpt", "head")

    def __init__(self, token: TokenDrafter, head: HeadEngine, k: int) -> None:
        self.token, self.head, self.k = token, head, k
        self.counts = {f"accepted_from_{source}": 0 for source in self.SOURCES}

    def start(self, first_token: int, first_hidden: torch.Tensor) -> None:
        self.token.start(first_token, first_hidden)
        self.head.start(first_token, first_hidden)

    def propose_tree(self) -> tuple[torch.Tensor, list[int]]:
        chains = [self.token.propose(self.k)[0], self.head.propose(self.k)[0].to(self.token.draft.device)]
        self.chains = torch.stack(chains).tolist()  # one host read for both
        self.nodes: list[tuple[int, int, set[str]]] = []  # (token, parent, sources): a trie of the two chains
        for source, chain in zip(self.SOURCES, self.chains):
            parent = -1
            for token in chain:
                node = next((i for i, (t, p, _) in enumerate(self.nodes) if p == parent and t == token), None)
                if node is None:
                    node = len(self.nodes)
                    self.nodes.append((token, parent, set()))
                self.nodes[node][2].add(source)
                parent = node
        return torch.tensor([t for t, _, _ in self.nodes]), [p for _, p, _ in self.nodes]

    def commit(self, tokens: list[int], hidden: torch.Tensor) -> None:
        accepted = tokens[:-1]  # the path's drafts; the last token is the target's own
        for source, chain in zip(self.SOURCES, self.chains):
            matched = next((i for i, (a, b) in enumerate(zip(chain, accepted)) if a != b), min(len(chain), len(accepted)))
            self.counts[f"accepted_from_{source}"] += matched
            if source == "eventgpt":
                self.token.keep(matched, tokens)
        self.head.commit(tokens, hidden)

