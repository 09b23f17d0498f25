"""Placing visual tokens where a prompt's placeholder ids stand (one id per visual token)."""

from __future__ import annotations

import torch
from torch import nn


def embed_with_visual_tokens(
    embed_tokens: nn.Embedding, input_ids: torch.Tensor, placeholder_id: int, visual_tokens: torch.Tensor | None
) -> torch.Tensor:
    """Embeddings [B, S, H] of `input_ids` with the placeholder rows replaced by `visual_tokens` [N, H].

    The prompt must hold exactly N placeholders per row; a mismatch is a ValueError
    because a silent partial splice would shift every later position.
    """
    placeholder = input_ids == placeholder_id
    embeds = embed_tokens(input_ids.masked_fill(placeholder, 0))  # the id may lie outside the vocabulary
    n_placeholders = int(placeholder.sum())
    if n_placeholders == 0:
        return embeds
    n_tokens = None if visual_tokens is None else visual_tokens.shape[0]
    if n_tokens is None or n_placeholders != n_tokens * input_ids.shape[0]:
        raise ValueError(f"prompt has {n_placeholders} visual placeholders but {n_tokens} visual tokens were given")
    rows = visual_tokens.to(embeds.dtype).expand(input_ids.shape[0], -1, -1)
    return embeds.masked_scatter(placeholder[..., None], rows)
