"""EAGLE-2's dynamic draft tree: candidates level by level, each level the `top_k` children of the level before
with the highest cumulative draft log-probability, then the best `nodes` of all, their ancestors kept.

EventGPT's `TokenTreeDrafter` grows it here on the host, level by level. The head's engine grows the same levels
on the device with static shapes so that a CUDA graph holds the whole expansion (`HeadEngine._tree`: every level
exactly `top_k` rows, children of a parent at -inf at -inf), then drops the -inf candidates and calls
`best_nodes`; tests hold its trees equal to the head's own forward over each node's path."""

from __future__ import annotations

import torch


def expand_level(level_scores: torch.Tensor, layer: list[int], top_k: int, tokens: list[int], parents: list[int],
                 scores: list[float]) -> list[int]:  # fmt: skip
    """Append to the candidates (tokens, parents, scores) the `top_k` best children of `layer` (candidate
    indices, -1 for the last committed token) by `level_scores` [len(layer), V], the cumulative log-probability
    of each child; children at -inf (fewer ids than top_k have mass) are left out. Returns the new layer."""
    best = level_scores.flatten().topk(min(top_k, level_scores.numel()))
    vocab, children = level_scores.shape[-1], []
    for flat, score in zip(best.indices.tolist(), best.values.tolist()):
        if score > float("-inf"):
            children.append(len(tokens))
            tokens.append(flat % vocab)
            parents.append(layer[flat // vocab])
            scores.append(score)
    return children


def best_nodes(parents: list[int], scores: list[float], nodes: int) -> list[int]:
    """The `nodes` best candidates by score and every ancestor of theirs (a child scores below its parent,
    but ties can drop one), in candidate order: parents before children."""
    kept: set[int] = set()
    for candidate in sorted(range(len(scores)), key=lambda c: -scores[c])[:nodes]:
        while candidate >= 0 and candidate not in kept:
            kept.add(candidate)
            candidate = parents[candidate]
    return sorted(kept)
