"""The two drafters of the speculative engine: EventGPT itself (`token`) and the draft head (`feature`).

Both propose only ids the two models share (`common_vocab`, the shared vocabulary's size;
the draft distribution is masked to it and renormalised) and return, when sampling, the
draft distribution padded to the target's vocabulary so the acceptance test can index it.
"""

from __future__ import annotations

import torch
from torch import nn

from evspec.adapter.modules import DraftHead
from evspec.models.tokenizer import readable_ids
from evspec.spec.decode import Sampler
from evspec.spec.fast_llama import FastLlama


def _propose_one(logits: torch.Tensor, common_vocab: int, target_vocab: int, sampler: Sampler):
    """One draft id (device tensor, no host sync) and its distribution over the target's ids."""
    logits = logits[..., :common_vocab]
    if sampler.greedy:
        return logits.argmax(-1), None
    q = sampler.probabilities(logits)
    padded = torch.zeros(*q.shape[:-1], target_vocab, device=q.device, dtype=q.dtype)
    padded[..., :common_vocab] = q
    return sampler.draw(q), padded


def _stacked(ids: list[torch.Tensor], probs: list[torch.Tensor | None]):
    return torch.stack(ids).view(-1), (torch.stack(probs).view(len(ids), -1) if probs[0] is not None else None)


class TokenDrafter:
    """EventGPT drafts autoregressively on its own fast engine (its prompt already prefilled).

    Its cache holds every committed token except those in `pending`, which the next
    proposal feeds first (the bonus token, and the last draft when all k were accepted).
    """

    def __init__(self, draft: FastLlama, common_vocab: int, target_vocab: int, unknown_id: int = 0) -> None:
        self.draft, self.common_vocab, self.target_vocab = draft, common_vocab, target_vocab
        self.draft_vocab = draft.lm_head.out_features
        self.unknown_id = unknown_id  # what the draft reads for a committed id only the target has
        self.pending: list[int] = []

    def start(self, first_token: int, first_hidden: torch.Tensor) -> None:
        self.pending = [first_token]

    def propose(self, k: int, sampler: Sampler):
        readable = readable_ids(self.pending, self.draft_vocab, self.unknown_id)
        out = self.draft.step(torch.tensor([readable], device=self.draft.device))
        self.base = self.draft.length
        ids, probs = [], []
        for position in range(k):
            token, q = _propose_one(out.logits[0, -1], self.common_vocab, self.target_vocab, sampler)
            ids.append(token)
            probs.append(q)
            if position < k - 1:
                out = self.draft.step(token.view(1, 1))
        self.proposed = ids
        return _stacked(ids, probs)

    def commit(self, tokens: list[int], hidden: torch.Tensor) -> None:
        n_accepted, k = len(tokens) - 1, len(self.proposed)
        self.draft.rewind(self.base + min(n_accepted, k - 1))  # drafts 1..k-1 were fed; keep the accepted
        self.pending = ([int(self.proposed[-1])] if n_accepted == k else []) + [tokens[-1]]


class HeadDrafter:
    """The cross-modal draft head: reads the target's own states and tokens, drafts via its lm_head."""

    def __init__(self, head: DraftHead, event_tokens: torch.Tensor | None, embed_tokens: nn.Embedding,
                 lm_head: nn.Linear, common_vocab: int) -> None:  # fmt: skip
        self.head, self.embed_tokens, self.lm_head = head, embed_tokens, lm_head
        parameter = next(head.parameters())
        self.dtype = parameter.dtype
        events = None if event_tokens is None else event_tokens[None].to(parameter.device, self.dtype)
        self.prefix = head.event_prefix(events)
        self.common_vocab = common_vocab
        self.target_vocab = lm_head.out_features

    def start(self, first_token: int, first_hidden: torch.Tensor) -> None:
        self.hidden = first_hidden[None].to(self.dtype)  # [n, H]: state behind each committed token
        self.tokens = torch.tensor([first_token], device=first_hidden.device)

    @torch.no_grad()
    def propose(self, k: int, sampler: Sampler):
        hidden, tokens = self.hidden, self.tokens
        ids, probs = [], []
        for _ in range(k):
            embeds = self.embed_tokens(tokens).to(self.dtype)
            state = self.head(hidden[None], embeds[None], self.prefix)[0, -1]
            token, q = _propose_one(self.lm_head(state.to(self.lm_head.weight.dtype)), self.common_vocab,
                                    self.target_vocab, sampler)  # fmt: skip
            ids.append(token)
            probs.append(q)
            hidden, tokens = torch.cat([hidden, state[None]]), torch.cat([tokens, token.view(1)])
        return _stacked(ids, probs)

    def commit(self, tokens: list[int], hidden: torch.Tensor) -> None:
        self.hidden = torch.cat([self.hidden, hidden.to(self.dtype)])
        self.tokens = torch.cat([self.tokens, torch.tensor(tokens, device=self.tokens.device)])


class PrefetchedDrafter(TokenDrafter):
    """A TokenDrafter whose first k drafts were made before the target's first token was known.

    The draft guessed the first token g0 itself and drafted g1..gk after it (while the
    target was still encoding video and prefilling). If the target's first token is g0,
    g1..gk are the first proposal, verified right away; otherwise they are dropped and
    the draft resumes from the target's token like a plain TokenDrafter.
    """

    def __init__(self, draft: FastLlama, common_vocab: int, target_vocab: int, prompt_length: int,
                 guesses: torch.Tensor) -> None:  # fmt: skip
        super().__init__(draft, common_vocab, target_vocab)
        self.prompt_length = prompt_length
        self.guesses = guesses  # [k + 1]: g0..gk; the draft's cache holds the prompt and g0..g(k-1)
        self.prefetched = False

    @staticmethod
    def draft_ahead(draft: FastLlama, prefill_logits: torch.Tensor, k: int, common_vocab: int) -> torch.Tensor:
        """Greedy g0..gk from the draft's prefill, without any host synchronisation."""
        token = prefill_logits[0, -1, :common_vocab].argmax(-1)
        guesses = [token]
        for _ in range(k):
            token = draft.step(token.view(1, 1)).logits[0, -1, :common_vocab].argmax(-1)
            guesses.append(token)
        return torch.stack(guesses)

    def start(self, first_token: int, first_hidden: torch.Tensor) -> None:
        self.prefetched = int(self.guesses[0]) == first_token
        if self.prefetched:
            self.base, self.proposed = self.prompt_length + 1, list(self.guesses[1:])
        else:
            self.draft.rewind(self.prompt_length)
            self.pending = [first_token]

    def propose(self, k: int, sampler: Sampler):
        if not self.prefetched:
            return super().propose(k, sampler)
        if k != len(self.proposed) or not sampler.greedy:
            raise ValueError("prefetched drafts are greedy and k long: draft ahead with the same k, temperature 0")
        self.prefetched = False
        return torch.stack(self.proposed), None
