"""Placing visual tokens where a prompt's placeholder ids stand (one id per visual token)."""

from __future__ import annotations

import torch
from torch import nn


def embed_with_visual_tokens(
    embed_tokens: nn.Embedding, input_ids: torch.Tensor, placeholder_id: int, visual_tokens: torch.Tensor | None
) -> torch.Tensor:
    """Embeddings [B, S, H] of `input_ids` with the placeholder rows replaced by `visual_tokens`.

    `visual_tokens` is [N, H] (the same for every row) or [B, N, H]. Each prompt row must
    hold exactly N placeholders; a mismatch is a ValueError
    because a silent partial splice would shift every later position.
    """
    placeholder = input_ids == placeholder_id
    embeds = embed_tokens(input_ids.masked_fill(placeholder, 0))  # the id may lie outside the vocabulary
    per_row = placeholder.sum(dim=1)
    if not bool(per_row.any()):
        return embeds
    n_tokens = None if visual_tokens is None else visual_tokens.shape[-2]
    if n_tokens is None or bool((per_row != n_tokens).any()):
        raise ValueError(f"prompt rows hold {per_row.tolist()} visual placeholders but {n_tokens} visual tokens were given")
    rows = visual_tokens.to(embeds.dtype).expand(input_ids.shape[0], -1, -1)
    return embeds.masked_scatter(placeholder[..., None], rows)
