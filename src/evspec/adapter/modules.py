"""The adapter stage's trainable modules: an alignment adapter and an EAGLE-style draft head.

- `AlignmentAdapter` maps the draft's final hidden state (EventGPT) to the target's
  (Video-LLaVA), so the target's own lm_head can read it.
- `DraftHead` predicts the target's next final hidden state from (its current one, the
  embedding of the token just chosen), attending to the clip's event tokens, and decodes
  through the target's frozen lm_head. One decoder layer: a few percent of a target step.
  Optionally it proposes only from a draft vocabulary (as EAGLE-3 does): the target's most
  frequent answer tokens on the train split, so drafting reads those rows of the lm_head
  only (at 7B, 8192 of 32064 rows: a drafted token reads 0.53 GB instead of 0.73 GB).

Both are plain torch (no transformers internals), so the engine can run them anywhere
and their state dicts round-trip through safetensors with the config that made them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from evspec.engine import matvec
from evspec.errors import InputError


@dataclass(frozen=True)
class AdapterConfig:
    in_size: int  # draft hidden width
    out_size: int  # target hidden width
    hidden_size: int = 256  # MLP width; 0 = a single linear map
    residual: bool = True  # add the input when widths match (starts near identity)


class AlignmentAdapter(nn.Module):
    """Draft hidden [..., in] -> target hidden [..., out]: Linear-GELU-Linear (+ input if widths match)."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.residual = config.residual and config.in_size == config.out_size
        if config.hidden_size:
            self.net = nn.Sequential(nn.Linear(config.in_size, config.hidden_size), nn.GELU(),
                                     nn.Linear(config.hidden_size, config.out_size))  # fmt: skip
            if self.residual:  # training starts from the identity map
                nn.init.zeros_(self.net[2].weight)
                nn.init.zeros_(self.net[2].bias)
        else:
            self.net = nn.Linear(config.in_size, config.out_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.net(hidden)
        return out + hidden if self.residual else out


@dataclass(frozen=True)
class HeadConfig:
    hidden_size: int  # target hidden width
    event_size: int  # width of the draft's projected event tokens
    n_heads: int = 4
    intermediate_size: int = 256
    use_events: bool = True  # False: the text-only ablation (EAGLE without the event camera)
    adapter_hidden_size: int = 256  # the event tokens' adapter into the target's width
    draft_vocab_size: int | None = None  # propose from this many target tokens only (None: the whole vocabulary)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class DraftHead(nn.Module):
    """One pre-norm decoder layer over the answer so far, with the event tokens as a visible prefix.

    Position i reads (hidden[i], embed(token[i])) and predicts hidden[i + 1]; it attends to
    every event token and to positions <= i. Event tokens are keys and values only.
    """

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        size = config.hidden_size
        if size % config.n_heads:
            raise ValueError(f"hidden_size {size} is not divisible by n_heads {config.n_heads}")
        self.fuse = nn.Linear(2 * size, size)
        self.event_adapter = (
            AlignmentAdapter(AdapterConfig(config.event_size, size, config.adapter_hidden_size))
            if config.use_events
            else None
        )
        self.attention_norm = RMSNorm(size)
        self.query_key_value = nn.Linear(size, 3 * size, bias=False)  # one matrix: one read per drafted token
        self.output = nn.Linear(size, size, bias=False)
        self.mlp_norm = RMSNorm(size)
        self.gate_up = nn.Linear(size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, size, bias=False)
        self.final_norm = RMSNorm(size)  # the target's lm_head reads normed states
        # the target token ids the head may propose, ascending (set by training; saved with the weights)
        size = config.draft_vocab_size
        self.register_buffer("draft_vocab", None if size is None else torch.arange(size))

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """The ids (distinct) the head may propose; stored ascending, so inverse-CDF sampling over them
        picks what sampling over the whole vocabulary with the others masked out picks."""
        ids = torch.unique(token_ids.long())  # sorted
        if self.draft_vocab is None or len(ids) != len(token_ids) or len(ids) != len(self.draft_vocab):
            raise ValueError(f"a draft vocabulary of {self.config.draft_vocab_size} distinct ids, not {len(token_ids)}")
        self.draft_vocab.copy_(ids)

    def event_prefix(self, event_tokens: torch.Tensor | None) -> torch.Tensor | None:
        """Adapted, normed event tokens [B, N, H]; computed once per clip and reused every step."""
        if self.event_adapter is None or event_tokens is None:
            return None
        return self.attention_norm(self.event_adapter(event_tokens))

    def forward(self, hidden: torch.Tensor, token_embeds: torch.Tensor, prefix: torch.Tensor | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """hidden, token_embeds: [B, L, H]; prefix: [B, N, H] or None; mask: [B, L] valid positions.

        Returns the predicted next hidden states [B, L, H]. (Training runs this over whole answers;
        the head engine runs the same `inputs`, `heads` and `block` position by position over a KV cache.)
        """
        batch, length, _ = hidden.shape
        x, normed = self.inputs(hidden, token_embeds)
        q, keys, values = self.heads(normed)
        if prefix is not None:
            prefix_keys, prefix_values = self.key_values(prefix)
            keys, values = torch.cat([prefix_keys, keys], dim=2), torch.cat([prefix_values, values], dim=2)
        n_prefix = keys.shape[2] - length
        # position i sees the whole prefix and answer positions <= i (and only valid ones)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        allowed = torch.cat([torch.ones(length, n_prefix, dtype=torch.bool, device=x.device), causal], dim=1)
        allowed = allowed.expand(batch, 1, length, -1)
        if mask is not None:
            valid_keys = torch.cat([torch.ones(batch, n_prefix, dtype=torch.bool, device=x.device), mask.bool()], dim=1)
            allowed = allowed & valid_keys[:, None, None, :]
        return self.block(x, q, keys, values, allowed)

    def inputs(self, hidden: torch.Tensor, token_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream x = fuse(hidden, embedding) [B, L, H] and its attention-normed form."""
        pairs = torch.cat([hidden, token_embeds], dim=-1)
        x = matvec.linear(pairs, self.fuse.weight, residual=self.fuse.bias.expand(*pairs.shape[:-1], -1))
        return x, self.attention_norm(x)

    def heads(self, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values [B, heads, L, H / heads] of normed answer positions, from one matmul."""
        return self._split_heads(matvec.linear(normed, self.query_key_value.weight), 3)

    def key_values(self, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of normed event tokens (no queries: they only ever are attended to)."""
        size = self.config.hidden_size
        return self._split_heads(F.linear(normed, self.query_key_value.weight[size:]), 2)

    def _split_heads(self, projected: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        batch, length, _ = projected.shape
        heads = self.config.n_heads
        return projected.view(batch, length, parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def block(self, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              allowed: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Attention of the positions x [B, L, H] (queries q) over keys/values where `allowed`, the MLP, the final norm."""
        return self.after_attention(x, F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed))

    def after_attention(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The block's rest on x [B, L, H] given its attention output [B, heads, L, H / heads].

        Projections go through `evspec.engine.matvec.linear` (the head engine's drafting is batch-1
        matrix-vector products: its kernel on CUDA, PyTorch's ops for training's batches and on CPU).
        """
        batch, length, size = x.shape
        x = matvec.linear(attended.transpose(1, 2).reshape(batch, length, size), self.output.weight, residual=x)
        gate_and_up = matvec.linear(self.mlp_norm(x), self.gate_up.weight)
        return self.final_norm(matvec.linear(gate_and_up, self.down.weight, residual=x, silu_pairs=True))


def load_head(path: Path) -> DraftHead:
    """A draft head saved by train-adapter: weights plus the HeadConfig stored in the metadata."""
    try:
        with safe_open(str(path), "pt") as handle:
            config = HeadConfig(**json.loads(handle.metadata()["config"]))
        head = DraftHead(config)
        head.load_state_dict(load_file(str(path)))
    except (OSError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as error:
        raise InputError(path, f"not a draft head checkpoint: {error}") from error
    return head.eval()
