"""Placing visual tokens where a prompt's placeholder ids stand (one id per visual token)."""

from __future__ import annotations

import torch
from torch import nn

from evspec.engine.kernels import host_to_device


def embed_with_visual_tokens(
    embed_tokens: nn.Embedding, input_ids: torch.Tensor, placeholder_id: int, visual_tokens: torch.Tensor | None
) -> torch.Tensor:
    """Embeddings [B, S, H] of `input_ids` with the placeholder rows replaced by `visual_tokens`.

    `visual_tokens` is [N, H] (the same for every row) or [B, N, H]. Each prompt row must
    hold exactly N placeholders; a mismatch is a ValueError because a silent partial splice
    would shift every later position. The placeholders are found on the host, so prompt
    ids given on the host (as `prompt_ids` makes them) cost no host synchronisation.
    """
    host_ids = input_ids.cpu()
    placeholder = host_ids == placeholder_id
    device = embed_tokens.weight.device
    embeds = embed_tokens(host_to_device(host_ids.masked_fill(placeholder, 0), device))  # the id may lie outside
    per_row = placeholder.sum(dim=1)
    if not bool(per_row.any()):
        return embeds
    n_tokens = None if visual_tokens is None else visual_tokens.shape[-2]
    if n_tokens is None or bool((per_row != n_tokens).any()):
        raise ValueError(f"prompt rows hold {per_row.tolist()} visual placeholders but {n_tokens} visual tokens were given")
    rows = visual_tokens.to(embeds.dtype).expand(input_ids.shape[0], -1, -1).reshape(-1, embeds.shape[-1])
    where = host_to_device(placeholder.view(-1).nonzero().view(-1), device)  # row-major: row by row, in order
    return embeds.view(-1, embeds.shape[-1]).index_copy(0, where, rows).view(embeds.shape)
