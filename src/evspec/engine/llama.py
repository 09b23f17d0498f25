"""The LLaMA engine: batch-1 prefill, steps and rewinds of either model's language half near the memory floor.

It runs the weights of a transformers `LlamaModel` without copying them: q/k/v and
gate/up are fused into one matrix each and the original modules are re-pointed at views
of it, so memory stays one copy of the weights. Feature extraction, stage timing and
speculation all run this engine, so what is trained on, timed and served is the same
kernels; transformers' own forward is the oracle the tests hold it equal to in fp32.

    engine = LlamaEngine(language_model, lm_head, max_length=2300)
    out = engine.prefill(prompt_embeds)     # a fresh cache; fused causal attention; last logits, all states
    out = engine.step(token_ids)            # 1 or k + 1 tokens after the cache
    engine.rewind(length)                   # rejected drafts: move the write position back
    out = engine.step_tree(token_ids, parents)  # a tree of drafts verified in one forward
    engine.keep(path)                       # its accepted path's K/V moved into place

On CUDA each step is a CUDA graph per (step length, length bucket) over layers compiled by
torch.compile (the default; `compile=False` captures eager kernels), attending only to the
filled buckets of the cache with the kernels `STEP_ATTENTION` names (`evspec.engine.kernels`);
a step's projections (one token or a verify's k + 1) are `evspec.engine.matvec`'s kernel,
which streams each weight once with the SiLU product and residual adds fused in.
The cache is written by position, so rolling back is a pointer move: entries past the
position are masked out and overwritten by the next step. On CPU the same code runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from evspec.engine import matvec
from evspec.engine.kernels import (ATTENTION, Graphs, additive_mask, attend, bucket_end, compile_per_shape,
                                   host_to_device, round_capacity)

# the attention kernels of one-token steps and of verifies on CUDA, chosen by benchmarks/decode.py (BENCHMARKS.md:
# fused SDPA is fastest for one query; for k + 1 queries it costs 1.16-1.19 steps where matmul costs 1.01-1.04)
STEP_ATTENTION = ("fused", "matmul")
# positions: on CUDA a prefill is padded at its end to a multiple of this and replayed as the graph of that
# length. Causal attention keeps the padding from the real positions, and the host queues one graph instead
# of every layer's kernels, so it is free to queue the other model's work (`prefill` overlap, BENCHMARKS.md)
PREFILL_BUCKET = 64


@dataclass
class EngineOutput:
    logits: torch.Tensor  # [1, n, V] for a step; [1, 1, V] (the last position) for a prefill
    hidden: torch.Tensor  # [1, n, H] after the final norm: what lm_head reads


def _fuse(modules: list[nn.Linear]) -> torch.Tensor:
    """Concatenate the modules' weights row-wise and make each module's weight a view of the result."""
    fused = torch.cat([m.weight.data for m in modules], dim=0)
    start = 0
    for module in modules:
        rows = module.weight.shape[0]
        module.weight.data = fused[start : start + rows]
        start += rows
    return fused


class LlamaEngine:
    """Static-cache LLaMA forward over an HF `LlamaModel`'s weights; positions continue from `length`."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Linear, max_length: int, compile: bool | None = None,
                 attention: tuple[str, str] | None = None, inductor_options: dict | None = None,
                 matvec_kernel: bool = True, prefill_bucket: int | None = None) -> None:  # fmt: skip
        """`compile` (default: on CUDA) fuses each layer's small kernels with torch.compile, with
        `inductor_options` (default: inductor's); `attention`: the kernels
        (`evspec.engine.kernels.attend`) of one-token steps and of longer ones; `matvec_kernel`: steps'
        projections by `evspec.engine.matvec` where it applies (CUDA, bf16/fp16), else PyTorch's ops;
        `prefill_bucket`: prefills padded to a multiple of it (default: `PREFILL_BUCKET` on CUDA, none on CPU)."""
        config = language_model.config
        self.embed_tokens = language_model.embed_tokens
        self.norm = language_model.norm
        self.lm_head = lm_head
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.capacity = round_capacity(max_length)
        weight = lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        on_cuda = self.device.type == "cuda"
        self.prefill_bucket = (PREFILL_BUCKET if on_cuda else 0) if prefill_bucket is None else prefill_bucket
        self.attention = attention or (STEP_ATTENTION if on_cuda else ("fused", "fused"))
        if not set(self.attention) <= set(ATTENTION):
            raise ValueError(f"attention kernels {self.attention}: each one of {ATTENTION}")
        self.layers = []
        for layer in language_model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            if any(getattr(m, "bias", None) is not None for m in (attention.q_proj, attention.k_proj, attention.v_proj)):
                raise ValueError("the engine supports LLaMA without attention biases (as Vicuna/EventGPT)")
            self.layers.append((  # plain tensors (not Parameters), so a compiled layer is not specialised per layer
                layer.input_layernorm.weight.detach(),
                _fuse([attention.q_proj, attention.k_proj, attention.v_proj]),
                attention.o_proj.weight.detach(),
                layer.post_attention_layernorm.weight.detach(),
                _fuse([mlp.gate_proj, mlp.up_proj]),
                mlp.down_proj.weight.detach(),
            ))  # fmt: skip
        self.shape = (self.n_heads, self.n_kv_heads, self.head_dim, config.rms_norm_eps, matvec_kernel)
        self.layer = _layer
        if on_cuda if compile is None else compile:
            # a step or prefill compiles for its exact shape first; once a second length or length bucket
            # appears, torch.compile's automatic dynamic shapes make just those sizes symbolic (one more
            # compilation each). The compiled prefill launches few kernels, so the host keeps ahead of the GPU.
            self.layer = compile_per_shape(_layer, inductor_options)
        cache_shape = (len(self.layers), 1, self.n_kv_heads, self.capacity, self.head_dim)
        self.keys = torch.zeros(cache_shape, device=self.device, dtype=self.dtype)
        self.values = torch.zeros(cache_shape, device=self.device, dtype=self.dtype)
        positions = torch.arange(self.capacity, device=self.device)
        probe = torch.zeros(1, 1, self.head_dim, device=self.device, dtype=self.dtype)
        cos, sin = language_model.rotary_emb(probe, positions[None])  # the model's own RoPE, scaling included
        self.cos, self.sin = cos[0], sin[0]  # [capacity, head_dim]
        self.key_positions = positions
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)  # next write position (device)
        self.length = 0  # the same, on the host
        # the open tree of the last tree steps: (cache length before it, parents, depths, ancestors [n, n])
        self.tree: tuple[int, list[int], list[int], torch.Tensor] | None = None
        self.graphs = Graphs(self.device)
        self.step_ids: dict[tuple, tuple[torch.Tensor, ...]] = {}  # the graphs' static inputs, per (n,) or ("tree", n, size)

    # ---- the forward ------------------------------------------------------------------------
    def _forward(self, embeds: torch.Tensor, attended: int | None,
                 tree: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:  # fmt: skip
        """The final hidden states [1, n, H] (after the norm) of embeds [1, n, H] written into cache slots
        position..position+n-1 (their K/V).

        `attended`: the cache prefix the queries read (masked by position); None: a prefill into an
        empty cache, causal over the n new positions only.
        `tree` (depths [n], ancestors [n, m + n] bool, m): the n tokens extend a tree whose first m tokens
        are the m slots before `position`; token i sits at the tree's first slot + depths[i] and reads the
        cache before the tree and its ancestors in it (itself included).
        """
        n = embeds.shape[1]
        positions = self.position + torch.arange(n, device=self.device)  # [n] cache slots
        if tree is None:
            rotary = positions
            visible = None if attended is None else self.key_positions[None, :attended] <= positions[:, None]
        else:
            depths, ancestors, m = tree
            start = self.position - m  # the tree's first slot
            rotary = start + depths
            offset = self.key_positions[:attended] - start  # key slot relative to the tree's first
            in_tree = (offset >= 0) & (offset < m + n)
            visible = (offset < 0)[None, :] | (ancestors[:, offset.clamp(0, m + n - 1)] & in_tree[None, :])
        bias = None if visible is None else additive_mask(visible, self.dtype)
        cos, sin = self.cos[rotary][None, None], self.sin[rotary][None, None]  # [1, 1, n, d]
        kernel = self.attention[int(n > 1)]
        x = embeds
        for index, weights in enumerate(self.layers):
            x = self.layer(x, weights, self.keys[index], self.values[index], positions, cos, sin, bias,
                               attended, kernel, self.shape)  # fmt: skip
        self.position += n
        return self.norm(x)

    def _decoded(self, hidden: torch.Tensor) -> EngineOutput:
        return EngineOutput(self.lm_head(hidden), hidden)

    # ---- public steps -----------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor) -> EngineOutput:
        """A fresh cache holding `embeds` [1, n, H] (the prompt, visual tokens spliced), any length.

        Logits [1, 1, V] for the last position only (what the first answer token needs); hidden states for
        all. With a `prefill_bucket`, the graph of the padded length (its hidden states are static outputs:
        read them before the next call).
        """
        self.reset()
        n = embeds.shape[1]
        self._check_room(n)
        size = min(-(-n // self.prefill_bucket) * self.prefill_bucket, self.capacity) if self.prefill_bucket else n
        padded = F.pad(embeds.to(self.dtype), (0, 0, 0, size - n))  # zeros after the prompt: causal, unread
        hidden = self._replay(("prefill", size), (padded,), lambda x: self._forward(x, None), None)[:, :n]
        self.length = n
        self.position.fill_(n)  # the padding's slots are past the length: overwritten by the next step
        return EngineOutput(self.lm_head(hidden[:, -1:]), hidden)

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor) -> EngineOutput:
        """Tokens [1, n] (on the engine's device) after the cache: a replayed graph per (n, bucket) on CUDA.

        The returned tensors are the graph's static outputs: read them before the next step.
        """
        n = token_ids.shape[1]
        self._check_room(n)
        attended = bucket_end(self.length + n, self.capacity)
        out = self._replay((n,), (token_ids,), lambda ids: self._decoded(self._forward(self.embed_tokens(ids), attended)),
                           attended)  # fmt: skip
        self.length += n
        self.tree = None
        return out

    def _replay(self, key: tuple, inputs: tuple[torch.Tensor, ...], forward, attended: int | None):
        """`forward(*inputs)` as the graph of (key, bucket) on CUDA, its inputs copied into static buffers
        kept per key. The caller advances the cache's length."""
        if self.graphs.enabled:
            if key not in self.step_ids:
                self.step_ids[key] = tuple(torch.zeros_like(t, device=self.device) for t in inputs)
            for static, value in zip(self.step_ids[key], inputs):
                static.copy_(value)
            inputs = self.step_ids[key]
        length = self.length
        return self.graphs.run((*key, attended), lambda: forward(*inputs), restore=lambda: self.position.fill_(length))

    @torch.no_grad()
    def step_tree(self, token_ids: torch.Tensor, parents: list[int], grow: bool = False) -> EngineOutput:
        """A tree of tokens [1, n] after the cache, verified in one forward (EAGLE's tree attention).

        `parents[i]` is the index of token i's parent in the tree (-1: the last committed token); parents
        come before their children. Token i reads the cache and its ancestors and sits at the position
        after its parent, so its logits are those of the chain cache + path to i. K/V go to the next n
        slots; `keep` moves the accepted path into place. With `grow`, the tokens extend the tree of the
        tree steps before (no other step or rewind between): parents index that whole tree, earlier
        tokens first, so a drafter can expand its tree level by level. A replayed graph per
        (n, tree size, bucket) on CUDA.
        """
        n = token_ids.shape[1]
        if grow and not self._tree_is_open():
            raise ValueError("grow extends the last tree step's tree, with no other step or rewind between")
        base, old_parents, old_depths, old_ancestors = self.tree if grow else (self.length, [], [], None)
        m = len(old_parents)
        if len(parents) != n or any(not -1 <= p < m + i for i, p in enumerate(parents)):
            raise ValueError(f"parents {parents}: one per token, each -1 or an earlier token's index")
        self._check_room(n)
        total = m + n
        depths, ancestors = old_depths + [0] * n, torch.zeros(total, total, dtype=torch.bool)
        if m:
            ancestors[:m, :m] = old_ancestors
        for node, parent in enumerate(parents, start=m):
            depths[node] = 0 if parent < 0 else depths[parent] + 1
            if parent >= 0:
                ancestors[node] = ancestors[parent]
            ancestors[node, node] = True
        attended = bucket_end(self.length + n, self.capacity)
        inputs = (token_ids, host_to_device(depths[m:], self.device), host_to_device(ancestors[m:], self.device))
        out = self._replay(("tree", n, total), inputs,
                           lambda ids, depth_ids, mask: self._decoded(
                               self._forward(self.embed_tokens(ids), attended, (depth_ids, mask, m))),
                           attended)  # fmt: skip
        self.length += n
        self.tree = (base, old_parents + list(parents), depths, ancestors)
        return out

    def _tree_is_open(self) -> bool:
        """A tree step came last: nothing stepped or rewound since."""
        return self.tree is not None and self.length == self.tree[0] + len(self.tree[1])

    def keep(self, nodes: list[int]) -> None:
        """After `step_tree`: the accepted path (token indices of the tree, from a root down) moved to the
        slots after the cache in every layer, the rest of the tree forgotten. Nothing is recomputed."""
        if not self._tree_is_open():
            raise ValueError("keep follows a tree step, with no other step or rewind between")
        base, parents = self.tree[:2]
        if not nodes or any(not 0 <= node < len(parents) for node in nodes) or \
                [parents[node] for node in nodes] != [-1, *nodes[:-1]]:  # fmt: skip
            raise ValueError(f"nodes {nodes}: not a path from a root of the tree {parents}")
        source = base + torch.tensor(nodes, device=self.device)
        target = base + torch.arange(len(nodes), device=self.device)
        for cache in (self.keys, self.values):  # [layers, 1, heads, capacity, head_dim]
            cache.index_copy_(3, target, cache.index_select(3, source))
        self.rewind(base + len(nodes))

    def rewind(self, length: int) -> None:
        """Forget positions >= length (rejected draft tokens): a pointer move, nothing is copied."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of {self.length} positions to {length}")
        self.length = length
        self.tree = None
        self.position.fill_(length)

    def reset(self) -> None:
        self.rewind(0)

    @torch.no_grad()
    def greedy(self, embeds: torch.Tensor, max_new_tokens: int, eos_token_id: int | None) -> tuple[list[int], torch.Tensor]:
        """Greedy answer after a prefill of `embeds`, and the final hidden state [L, H] behind each answer token.

        One host read per token: this is for feature extraction and reference answers, not for serving.
        """
        out = self.prefill(embeds)
        tokens: list[int] = []
        hidden: list[torch.Tensor] = []
        while True:
            token = out.logits[0, -1].argmax()
            tokens.append(int(token))
            hidden.append(out.hidden[0, -1].clone())
            if tokens[-1] == eos_token_id or len(tokens) == max_new_tokens:
                return tokens, torch.stack(hidden)
            out = self.step(token.view(1, 1))

    def _check_room(self, n: int) -> None:
        if self.length + n > self.capacity:
            raise ValueError(f"static cache of {self.capacity} positions is full ({self.length} + {n})")


def _layer(x: torch.Tensor, weights: tuple, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
           cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor | None, attended: int | None, kernel: str,
           shape: tuple) -> torch.Tensor:  # fmt: skip
    """One LLaMA decoder layer on x [1, n, H], writing its K/V at `positions` (transformers' arithmetic, fp32 norms)."""
    input_norm, qkv, o, post_norm, gate_up, down = weights
    n_heads, n_kv_heads, head_dim, eps, matvec_kernel = shape
    n = x.shape[1]
    q_size, kv_size = n_heads * head_dim, n_kv_heads * head_dim
    normed = _rms_norm(x, input_norm, eps)
    q, k, v = matvec.linear(normed, qkv, kernel=matvec_kernel).split([q_size, kv_size, kv_size], dim=-1)
    q = _rotate(q.view(1, n, n_heads, head_dim).transpose(1, 2), cos, sin)
    k = _rotate(k.view(1, n, n_kv_heads, head_dim).transpose(1, 2), cos, sin)
    v = v.view(1, n, n_kv_heads, head_dim).transpose(1, 2)
    keys.index_copy_(2, positions, k)
    values.index_copy_(2, positions, v)
    if attended is None:  # prefill into an empty cache: causal over the new positions, fused kernel
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_kv_heads != n_heads)
    else:
        attention = attend(q, keys[:, :, :attended], values[:, :, :attended], bias, kernel)
    x = matvec.linear(attention.transpose(1, 2).reshape(1, n, q_size), o, residual=x, kernel=matvec_kernel)
    gate_and_up = matvec.linear(_rms_norm(x, post_norm, eps), gate_up, kernel=matvec_kernel)
    return matvec.linear(gate_and_up, down, residual=x, silu_pairs=True, kernel=matvec_kernel)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA's RMSNorm exactly as transformers computes it: in fp32, scaled in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
