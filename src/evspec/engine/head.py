"""The draft head as an engine: a static KV cache and the whole k-token proposal as one CUDA graph.

The head (`evspec.adapter.modules.DraftHead`) is one decoder layer. Position i reads the
pair (h_i, t_i): the target's state whose lm_head chose token t_i and that token. Its key
and value depend on that pair only, so the cache holds, in order:

    [event tokens of the clip (computed once per clip)] [one entry per committed pair] [drafts]

`propose(k)` runs, in one graph: the keys/values of the pairs committed since the last
proposal (up to k + 1 slots; the slots past the count are written beyond the committed
length and overwritten later), the block at the last committed pair, then k - 1 single
positions fed the head's own predicted state and draft token. Each position decodes through
the target's lm_head (only the rows of the head's draft vocabulary, when it has one: the
draft's law is then zero outside it, which speculative sampling allows); greedy takes the
argmax, sampling inverts the warped distribution's CDF at uniforms drawn from the
drafter's own random stream before the replay. A drafted
token therefore costs one layer plus the lm_head whatever the answer's length: the cache is
read only up to the filled bucket, by the target engine's fused attention with the mask as a
bias (`evspec.engine.kernels`), and every projection, the lm_head rows included, is
`evspec.engine.matvec`'s kernel on CUDA.

It is a `Drafter` (start / propose / commit) of `evspec.speculative.decode`.
"""

from __future__ import annotations

import torch
from torch import nn

from evspec.adapter.modules import DraftHead
from evspec.engine import matvec
from evspec.engine.kernels import (Graphs, additive_mask, attend, bucket_end, compile_per_shape, host_to_device,
                                   round_capacity)
from evspec.speculative.sampling import Sampler, inverse_cdf
from evspec.speculative.trees import best_nodes


class HeadEngine:
    def __init__(self, head: DraftHead, embed_tokens: nn.Embedding, lm_head: nn.Linear, max_events: int,
                 max_answer: int, max_k: int, sampler: Sampler, compile: bool | None = None,
                 inductor_options: dict | None = None) -> None:  # fmt: skip
        """Room for `max_events` event tokens, answers of `max_answer` tokens and proposals of up to `max_k`;
        `compile` (default: on CUDA) with `inductor_options` (default: inductor's)."""
        self.head, self.embed_tokens, self.sampler = head, embed_tokens, sampler
        parameter = next(head.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        if lm_head.bias is not None:
            raise ValueError("the head engine decodes through a LLaMA lm_head, which has no bias")
        self.vocab_size = lm_head.out_features
        self.draft_vocab = head.draft_vocab  # None: every token
        # the rows drafting reads: a copy of the draft vocabulary's rows, or the lm_head itself
        self.draft_lm_head = lm_head.weight if self.draft_vocab is None else lm_head.weight[self.draft_vocab].contiguous()
        size, heads = head.config.hidden_size, head.config.n_heads
        self.capacity = round_capacity(max_events + max_answer + 2 * max_k + 2)
        self.max_k = max_k
        self.keys = torch.zeros(1, heads, self.capacity, size // heads, device=self.device, dtype=self.dtype)
        self.values = torch.zeros_like(self.keys)
        self.key_positions = torch.arange(self.capacity, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)  # committed length (device)
        self.count = torch.ones(1, dtype=torch.long, device=self.device)  # pairs waiting in the slots
        self.slot_hidden = torch.zeros(max_k + 1, size, device=self.device, dtype=self.dtype)
        self.slot_tokens = torch.zeros(max_k + 1, dtype=torch.long, device=self.device)
        self.uniforms = torch.zeros(max_k, device=self.device)
        self.offsets = torch.arange(max_k + 1, device=self.device)
        self.length = self.n_events = 0  # committed length on the host; the event prefix's length
        self.pending: tuple[torch.Tensor, list[int]] | None = None  # (hidden [m, H], tokens) not yet in the cache
        self.graphs = Graphs(self.device)
        self.body = self._propose
        if self.device.type == "cuda" if compile is None else compile:
            self.body = compile_per_shape(self._propose, inductor_options, dynamic=False)  # per (k, bucket)

    @torch.no_grad()
    def load_events(self, event_tokens: torch.Tensor | None) -> None:
        """The clip's event tokens [N, D_event] (EventGPT's projected tokens) as the cache's prefix; None: none."""
        prefix = None if event_tokens is None else self.head.event_prefix(event_tokens[None].to(self.device, self.dtype))
        self.n_events = 0 if prefix is None else prefix.shape[1]
        if self.n_events:
            keys, values = self.head.key_values(prefix)
            self.keys[:, :, : self.n_events] = keys
            self.values[:, :, : self.n_events] = values

    def start(self, first_token: int, first_hidden: torch.Tensor) -> None:
        """A new answer after the event prefix: its first token and the target state that chose it."""
        self.length = self.n_events
        self.position.fill_(self.length)
        self.pending = (first_hidden.reshape(1, -1), [first_token])

    def commit(self, tokens: list[int], hidden: torch.Tensor) -> None:
        """The target kept `tokens`; `hidden` [m, H] are the states that chose them."""
        if self.pending is not None:  # committed twice without a proposal between (evaluation walks answers)
            hidden, tokens = torch.cat([self.pending[0], hidden]), self.pending[1] + list(tokens)
        self.pending = (hidden, list(tokens))

    @torch.no_grad()
    def propose(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k draft ids [k] and, when sampling, their distributions [k, V]: the graph's outputs, read before the next call."""
        if not 1 <= k <= self.max_k:
            raise ValueError(f"k = {k} outside 1..{self.max_k} (the engine's max_k)")
        m = self._fill_slots(k + 1, 2 * k)
        if not self.sampler.greedy:
            self.uniforms[:k].copy_(self.sampler.uniform(k, self.device))
        attended = bucket_end(self.length + m + k, self.capacity)
        length = self.length
        out = self.graphs.run((k, attended), lambda: self.body(k, attended), restore=lambda: None)
        self.length = length + m
        self.position.fill_(self.length)
        self.pending = None
        return out

    def _fill_slots(self, slots: int, room: int) -> int:
        """The pending pairs into the first of `slots` slots (older ones cached first); checks the cache has
        `room` more positions past them. Returns their count."""
        hidden, tokens = self.pending
        if len(tokens) > slots:  # more pairs than slots: cache the older ones first (eagerly)
            self._cache_pairs(hidden[:-slots], tokens[:-slots])
            hidden, tokens = hidden[-slots:], tokens[-slots:]
        m = len(tokens)
        if self.length + m + room > self.capacity:
            raise ValueError(f"head cache of {self.capacity} positions is full ({self.length} + {m} + {room})")
        self.slot_hidden[:m].copy_(hidden)
        self.slot_tokens[:m].copy_(host_to_device(tokens, self.device))
        self.count.fill_(m)
        return m

    def _state_after_pairs(self, slots: int, attended: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the pairs in the first `slots` slots (those past `count` land past the committed
        length, to be overwritten), and the head's state [1, 1, H] at the last pair, with its position."""
        x, normed = self.head.inputs(self.slot_hidden[None, :slots], self._embed(self.slot_tokens[:slots]))
        q = self._write(normed, self.position + self.offsets[:slots])
        last = self.count - 1
        query_position = self.position + last
        return self._block(x.index_select(1, last), q.index_select(2, last), query_position, attended), query_position

    def _logits(self, state: torch.Tensor) -> torch.Tensor:
        """[rows, V or draft vocab] for states [1, rows, H], through the lm_head rows drafting reads."""
        return matvec.linear(state.to(self.draft_lm_head.dtype), self.draft_lm_head)[0]

    def _propose(self, k: int, attended: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The proposal (see the module docstring); reads the slots, `count`, `position` and `uniforms`."""
        state, query_position = self._state_after_pairs(k + 1, attended)
        ids, probs = [], []
        for j in range(k):
            logits = self._logits(state)  # [1, V or draft vocab]
            if self.sampler.greedy:
                token, q = logits.argmax(-1), None
            else:
                q = self.sampler.probabilities(logits)
                token = inverse_cdf(q, self.uniforms[j : j + 1])
            if self.draft_vocab is not None:  # back to target ids; the law over the whole vocabulary
                token = self.draft_vocab[token]
                q = None if q is None else q.new_zeros(1, self.vocab_size).index_copy_(1, self.draft_vocab, q)
            ids.append(token)
            probs.append(q)
            if j < k - 1:
                query_position = query_position + 1
                x, normed = self.head.inputs(state, self._embed(token))
                state = self._block(x, self._write(normed, query_position), query_position, attended)
        return torch.cat(ids), (torch.cat(probs) if probs[0] is not None else None)

    @torch.no_grad()
    def draft_tree(self, depth: int, top_k: int, nodes: int) -> tuple[torch.Tensor, list[int]]:
        """An EAGLE-2 tree of drafts: `depth` levels, each the `top_k` children of the level before with the
        highest cumulative log-probability (the sampling spec's warped law when sampling: the tree is a
        deterministic function of it), then the `nodes` best of all; ids [n] (target ids) and each one's
        parent (-1: the last committed token; parents first), as `evspec.speculative.decode.TreeDrafter`.

        The levels are grown on the device with static shapes (`_tree`), one CUDA graph per (depth, top-k,
        length bucket) on GPU, and read by the host once; choosing the `nodes` best is host work on depth x top-k
        candidates. A node reads the pair (its parent's predicted state, its token) and attends to the committed
        cache and its ancestors; its K/V go past the committed length, where the next proposal overwrites them.
        """
        if not 1 <= depth * top_k <= self.max_k:
            raise ValueError(f"a tree of depth {depth} x top-k {top_k} needs max_k >= {depth * top_k}")
        m = self._fill_slots(self.max_k + 1, depth * top_k)
        attended = bucket_end(self.length + m + depth * top_k, self.capacity)
        out = self.graphs.run(("tree", depth, top_k, attended), lambda: self._tree(depth, top_k, attended),
                              restore=lambda: None)  # fmt: skip
        level_tokens, level_rows, level_scores = (values.tolist() for values in out)
        self.length += m
        self.position.fill_(self.length)
        self.pending = None
        tokens, parents, scores = [], [], []  # the candidates, level by level (those at -inf left out)
        candidate: dict[tuple[int, int], int] = {}  # (level, row) -> candidate
        for level in range(depth):
            for row in range(top_k):
                parent = -1 if level == 0 else candidate.get((level - 1, level_rows[level][row]))
                if level_scores[level][row] == float("-inf") or parent is None:
                    continue
                candidate[(level, row)] = len(tokens)
                tokens.append(level_tokens[level][row])
                parents.append(parent)
                scores.append(level_scores[level][row])
        chosen = best_nodes(parents, scores, nodes)
        index = {c: i for i, c in enumerate(chosen)}
        ids = torch.tensor([tokens[c] for c in chosen], dtype=torch.long)
        if self.draft_vocab is not None:  # positions in the draft vocabulary -> target ids
            ids = self.draft_vocab.cpu()[ids]
        return ids, [index.get(parents[c], -1) for c in chosen]

    def _tree(self, depth: int, top_k: int, attended: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tree's levels [depth, top_k]: each level's tokens (draft-vocabulary positions when the head has
        one), the row of each one's parent in the level before, and cumulative log-probabilities. Level l + 1 is
        the `top_k` best children of level l's nodes (EAGLE-2's expansion, `evspec.speculative.trees`), read by
        the head at slots past the committed pairs, each attending to the committed cache and its ancestors."""
        state, _ = self._state_after_pairs(self.max_k + 1, attended)  # [1, 1, H] at the last committed pair
        base = self.position + self.count  # the first slot past the committed pairs
        positions = self.key_positions[None, :attended]
        best = self._log_probs(state[0]).flatten().topk(top_k)
        tokens, rows, scores = [best.indices], [torch.zeros_like(best.indices)], [best.values]
        states, ancestors = state, torch.zeros(1, attended, dtype=torch.bool, device=self.device)
        for level in range(1, depth):  # the head reads level - 1's nodes, for their children
            ids = tokens[-1] if self.draft_vocab is None else self.draft_vocab[tokens[-1]]
            x, normed = self.head.inputs(states[:, rows[-1]], self._embed(ids))
            slots = base + (level - 1) * top_k + self.offsets[:top_k]
            q = self._write(normed, slots)
            ancestors = ancestors[rows[-1]] | (positions == slots[:, None])
            states = self._attend(x, q, (positions < base) | ancestors, attended)
            level_scores = scores[-1][:, None] + self._log_probs(states[0])  # [top_k, V or draft vocab]
            children = level_scores.flatten().topk(top_k)
            tokens.append(children.indices % level_scores.shape[-1])
            rows.append(children.indices // level_scores.shape[-1])
            scores.append(children.values)
        return torch.stack(tokens), torch.stack(rows), torch.stack(scores)

    def _log_probs(self, states: torch.Tensor) -> torch.Tensor:
        """Drafting's log-probabilities [rows, V or draft vocab] of states [rows, H] (warped when sampling)."""
        return self.sampler.tree_scores(self._logits(states[None]))

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)[None].to(self.dtype)

    def _write(self, normed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cache the positions' keys and values; return their queries."""
        q, keys, values = self.head.heads(normed)
        self.keys.index_copy_(2, positions, keys)
        self.values.index_copy_(2, positions, values)
        return q

    def _block(self, x: torch.Tensor, q: torch.Tensor, query_positions: torch.Tensor, attended: int) -> torch.Tensor:
        """The block at answer positions: each query sees the cache up to its own position."""
        return self._attend(x, q, self.key_positions[None, :attended] <= query_positions[:, None], attended)

    def _attend(self, x: torch.Tensor, q: torch.Tensor, visible: torch.Tensor, attended: int) -> torch.Tensor:
        """Queries q over the cache's first `attended` positions where `visible` [n, attended], then the block's rest."""
        keys, values = self.keys[:, :, :attended], self.values[:, :, :attended]
        return self.head.after_attention(x, attend(q, keys, values, additive_mask(visible, self.dtype), "fused"))

    def _cache_pairs(self, hidden: torch.Tensor, tokens: list[int]) -> None:
        """Keys/values of committed pairs that no proposal will query (outside the graph)."""
        _, normed = self.head.inputs(hidden[None].to(self.dtype), self._embed(host_to_device(tokens, self.device)))
        self._write(normed, self.position + torch.arange(len(tokens), device=self.device))
        self.length += len(tokens)
        self.position.fill_(self.length)
