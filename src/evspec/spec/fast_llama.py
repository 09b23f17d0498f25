"""A LLaMA decoder for batch-1 decoding near the memory floor: static KV cache, CUDA graphs.

It runs the weights of a transformers `LlamaModel` (the language half of either model)
without copying them: q/k/v and gate/up are fused into one matrix each and the original
modules are re-pointed at views of it, so memory stays one copy of the weights.

    engine = FastLlama(language_model, lm_head, max_length=2300)
    out = engine.forward_embeds(prompt_embeds)   # prefill, eager (any length)
    out = engine.step(token_ids)                 # 1 or k+1 tokens: a CUDA graph per length on GPU
    engine.rewind(length)                        # rejected drafts: move the write position back

The cache is written by position, so rolling back is a pointer move: entries past the
position are masked out of attention and overwritten by the next step (no copies).
On CPU the same code runs eagerly; the test that compares it with transformers'
forward in fp32 is what makes the fast path trustworthy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class FastOutput:
    logits: torch.Tensor  # [1, n, V]
    hidden: torch.Tensor  # [1, n, H] after the final norm


def _fuse(modules: list[nn.Linear]) -> torch.Tensor:
    """Concatenate the modules' weights row-wise and make each module's weight a view of the result."""
    fused = torch.cat([m.weight.data for m in modules], dim=0)
    start = 0
    for module in modules:
        rows = module.weight.shape[0]
        module.weight.data = fused[start : start + rows]
        start += rows
    return fused


class FastLlama:
    """Static-cache LLaMA forward over an HF `LlamaModel`'s weights; positions continue from `length`."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Linear, max_length: int, compile: bool = False) -> None:
        """`compile=True` fuses each layer's small kernels with torch.compile (GPU; compiles once per step length)."""
        config = language_model.config
        self.embed_tokens = language_model.embed_tokens
        self.norm = language_model.norm
        self.lm_head = lm_head
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.max_length = max_length
        weight = lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.layers = []
        for layer in language_model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            if any(getattr(m, "bias", None) is not None for m in (attention.q_proj, attention.k_proj, attention.v_proj)):
                raise ValueError("FastLlama supports LLaMA without attention biases (as Vicuna/EventGPT)")
            self.layers.append((  # plain tensors (not Parameters), so a compiled layer is not specialised per layer
                layer.input_layernorm.weight.detach(),
                _fuse([attention.q_proj, attention.k_proj, attention.v_proj]),
                attention.o_proj.weight.detach(),
                layer.post_attention_layernorm.weight.detach(),
                _fuse([mlp.gate_proj, mlp.up_proj]),
                mlp.down_proj.weight.detach(),
            ))  # fmt: skip
        self.eps = config.rms_norm_eps
        self.step_layer = _layer
        if compile:  # one compilation per step length (1, k + 1): the prefill stays eager
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.step_layer = torch.compile(_layer, fullgraph=True, dynamic=False)
        cache_shape = (len(self.layers), 1, self.n_kv_heads, max_length, self.head_dim)
        self.keys = torch.zeros(cache_shape, device=self.device, dtype=self.dtype)
        self.values = torch.zeros(cache_shape, device=self.device, dtype=self.dtype)
        positions = torch.arange(max_length, device=self.device)
        probe = torch.zeros(1, 1, self.head_dim, device=self.device, dtype=self.dtype)
        cos, sin = language_model.rotary_emb(probe, positions[None])  # the model's own RoPE, scaling included
        self.cos, self.sin = cos[0], sin[0]  # [max_length, head_dim]
        self.key_positions = positions
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)  # next write position (device)
        self.length = 0  # the same, on the host
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, FastOutput]] = {}

    # ---- the forward ------------------------------------------------------------------------
    def _forward(self, embeds: torch.Tensor, layer_function) -> FastOutput:
        """embeds [1, n, H] at positions position..position+n-1; writes their K/V into the cache."""
        n = embeds.shape[1]
        positions = self.position + torch.arange(n, device=self.device)  # [n]
        cos, sin = self.cos[positions][None, None], self.sin[positions][None, None]  # [1, 1, n, d]
        visible = self.key_positions[None, :] <= positions[:, None]  # [n, max_length]: causal over the cache
        x = embeds
        shape = (self.n_heads, self.n_kv_heads, self.head_dim, self.eps)
        for index, weights in enumerate(self.layers):
            x = layer_function(x, weights, self.keys[index], self.values[index], positions, cos, sin, visible, shape)
        hidden = self.norm(x)
        self.position += n
        return FastOutput(self.lm_head(hidden), hidden)

    # ---- public steps -----------------------------------------------------------------------
    @torch.no_grad()
    def forward_embeds(self, embeds: torch.Tensor) -> FastOutput:
        """Eager forward of any length (the prefill, with visual tokens already spliced)."""
        self._check_room(embeds.shape[1])
        out = self._forward(embeds.to(self.dtype), _layer)
        self.length += embeds.shape[1]
        return out

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor) -> FastOutput:
        """Tokens [1, n] after the cache: a captured graph per n on CUDA, eager elsewhere.

        The returned tensors are the graph's static outputs: read them before the next step.
        """
        n = token_ids.shape[1]
        self._check_room(n)
        if self.device.type != "cuda":
            out = self._forward(self.embed_tokens(token_ids), self.step_layer)
        else:
            graph, ids, out = self.graphs.get(n) or self._capture(n)
            ids.copy_(token_ids)
            graph.replay()
        self.length += n
        return out

    def rewind(self, length: int) -> None:
        """Forget positions >= length (rejected draft tokens): a pointer move, nothing is copied."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a cache of {self.length} positions to {length}")
        self.length = length
        self.position.fill_(length)

    def reset(self) -> None:
        self.rewind(0)

    def _check_room(self, n: int) -> None:
        if self.length + n > self.max_length:
            raise ValueError(f"static cache of {self.max_length} positions is full ({self.length} + {n})")

    def _capture(self, n: int):
        """Record one n-token step as a CUDA graph (after a warm-up on a side stream, as CUDA requires)."""
        ids = torch.zeros(1, n, dtype=torch.long, device=self.device)
        saved = self.position.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.position.copy_(saved)
                self._forward(self.embed_tokens(ids), self.step_layer)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        self.position.copy_(saved)
        with torch.cuda.graph(graph):
            out = self._forward(self.embed_tokens(ids), self.step_layer)
        self.position.copy_(saved)  # capture does not run the kernels; the cache holds warm-up garbage
        self.graphs[n] = (graph, ids, out)  # past `position`, which the next real step overwrites
        return self.graphs[n]


def _layer(x: torch.Tensor, weights: tuple, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
           cos: torch.Tensor, sin: torch.Tensor, visible: torch.Tensor, shape: tuple) -> torch.Tensor:  # fmt: skip
    """One LLaMA decoder layer on x [1, n, H], writing its K/V at `positions` (HF's arithmetic, fp32 norms)."""
    input_norm, qkv, o, post_norm, gate_up, down = weights
    n_heads, n_kv_heads, head_dim, eps = shape
    n = x.shape[1]
    q_size, kv_size = n_heads * head_dim, n_kv_heads * head_dim
    q, k, v = F.linear(_rms_norm(x, input_norm, eps), qkv).split([q_size, kv_size, kv_size], dim=-1)
    q = _rotate(q.view(1, n, n_heads, head_dim).transpose(1, 2), cos, sin)
    k = _rotate(k.view(1, n, n_kv_heads, head_dim).transpose(1, 2), cos, sin)
    keys.index_copy_(2, positions, k)
    values.index_copy_(2, positions, v.view(1, n, n_kv_heads, head_dim).transpose(1, 2))
    attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=n_kv_heads != n_heads)
    x = x + F.linear(attended.transpose(1, 2).reshape(1, n, q_size), o)
    gate, up = F.linear(_rms_norm(x, post_norm, eps), gate_up).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, down)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA's RMSNorm exactly as transformers computes it: in fp32, scaled in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
