"""Speculative decoding on the fast engine: the target alone, and draft-then-verify with any drafter.

One cycle (gpt-fast style):
    1. the drafter proposes k tokens d1..dk (and, when sampling, their draft distributions q);
    2. the target runs [last, d1..dk] in one forward: p1..p(k+1);
    3. greedy: keep d_i while it equals argmax p_i; sampling: keep d_i with probability
       min(1, p_i(d_i) / q_i(d_i)), and at the first rejection draw from normalise(max(0, p_i - q_i)).
       Either way one more token comes from the target itself (the bonus token), so each
       cycle yields accepted + 1 tokens and the output is exactly the target's.
    4. the target's cache is rewound past the rejected drafts (a pointer move).
The only host synchronisation per cycle is reading the number accepted.

Trees (EAGLE-2): a `TreeDrafter` proposes a tree instead of a chain; the target verifies all its
drafts in one forward with tree attention (`LlamaEngine.step_tree`), keeps a path of drafts plus
its own next token, and moves that path's K/V into place (`keep`). Greedy keeps the longest path
its argmax agrees with. Sampling walks down by recursive rejection over siblings: a tree's drafts
are chosen deterministically from the draft's scores, so each is a draft drawn from a point mass,
accepted with probability p'(x) where p' is the target's law after its parent with the siblings
rejected before it removed and renormalised; when every child is rejected the target's token is
drawn from that p'. The token that comes out at each node therefore follows p exactly.

Vocabularies: the draft proposes only ids both models share (`SharedVocabulary`: its
logits are masked to them before the sampling spec applies); the target's distribution is
never masked, so ids only the target has stay reachable through the residual and the bonus.
Each drafter holds its own `Sampler` (same spec; its random stream on the draft's device).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from evspec.engine.kernels import host_to_device
from evspec.engine.llama import EngineOutput, LlamaEngine
from evspec.speculative.sampling import Sampler


@dataclass
class Decoded:
    """What one answer cost: the ids, target forwards, and per-position draft acceptance."""

    output_ids: list[int]
    target_forwards: int | None = 0  # None where it is not known (transformers' assisted generation)
    drafted: int = 0
    accepted: int = 0
    # per draft position 1..k, counting only positions inside the answer (a draft past the answer's end
    # is verified but not needed, so it counts neither way): cycles that drafted it, that reached it (all
    # earlier drafts accepted), and that accepted it
    drafted_per_position: list[int] = field(default_factory=list)
    reached_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    # the drafter's own counts (`drafters.DRAFTER_COUNTS`): `hybrid`'s accepted drafts per source, `cascade`'s stages
    drafter_counts: dict[str, int] | None = None


class Drafter(Protocol):
    """Proposes k tokens after the committed ones; told what the target committed after each cycle."""

    def start(self, first_token: int, first_hidden: torch.Tensor) -> None: ...

    def propose(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft ids [k] and, when sampling, the distributions [k, V_target] they were drawn from (else None)."""

    def commit(self, tokens: list[int], hidden: torch.Tensor) -> None:
        """The target kept `tokens` (accepted drafts + the bonus); `hidden` [n, H] are the states behind them."""


class TreeDrafter(Protocol):
    """Proposes a tree of drafts after the committed tokens (EAGLE-2's draft tree); told what was committed."""

    def start(self, first_token: int, first_hidden: torch.Tensor) -> None: ...

    def propose_tree(self) -> tuple[torch.Tensor, list[int]]:
        """Draft ids [n] and each one's parent: -1 for a child of the last committed token, else the index of
        an earlier draft (parents before children)."""

    def commit(self, tokens: list[int], hidden: torch.Tensor) -> None:
        """The target kept `tokens` (the accepted path + its own next token); `hidden` [n, H] behind them."""


def _finish(tokens: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    tokens = tokens[:max_new_tokens]
    if eos_token_id is not None and eos_token_id in tokens:
        tokens = tokens[: tokens.index(eos_token_id) + 1]
    return tokens


def _done(tokens: list[int], max_new_tokens: int, eos_token_id: int | None) -> bool:
    return len(tokens) >= max_new_tokens or (eos_token_id is not None and eos_token_id in tokens)


def decode_target(target: LlamaEngine, prefill_logits: torch.Tensor, max_new_tokens: int, eos_token_id: int | None,
                  sampler: Sampler) -> Decoded:  # fmt: skip
    """The baseline: one target step per token after the prefill (whose last logits give token 1)."""
    token = sampler.pick(prefill_logits[:, -1])  # [1]
    tokens = [int(token)]
    result = Decoded(tokens)
    while not _done(tokens, max_new_tokens, eos_token_id):
        out = target.step(token.view(1, 1))
        token = sampler.pick(out.logits[:, -1])
        tokens.append(int(token))
        result.target_forwards += 1
    result.output_ids = _finish(tokens, max_new_tokens, eos_token_id)
    return result


def decode_speculative(target: LlamaEngine, prefill: EngineOutput, drafter: Drafter, k: int, max_new_tokens: int,
                       eos_token_id: int | None, sampler: Sampler) -> Decoded:  # fmt: skip
    """Draft k, verify k + 1, keep the agreed prefix plus one target token; repeat."""
    first = sampler.pick(prefill.logits[:, -1])
    tokens = [int(first)]
    result = Decoded(tokens, drafted_per_position=[0] * k, reached_per_position=[0] * k, accepted_per_position=[0] * k)
    drafter.start(tokens[0], prefill.hidden[0, -1])
    while not _done(tokens, max_new_tokens, eos_token_id):
        base = target.length
        draft_ids, draft_probs = drafter.propose(k)
        draft_ids = draft_ids.to(target.device, non_blocking=True)  # a no-op unless the draft has its own GPU
        draft_probs = None if draft_probs is None else draft_probs.to(target.device, non_blocking=True)
        verify_ids = torch.cat([host_to_device([tokens[-1]], target.device), draft_ids])[None]
        out = target.step(verify_ids)  # logits [1, k + 1, V]: row i predicts what follows verify_ids[i]
        n_accepted, bonus = _accept(out.logits[0], draft_ids, draft_probs, sampler)
        kept = draft_ids[:n_accepted].tolist() + [bonus]
        hidden = out.hidden[0, : n_accepted + 1].clone()  # the states behind the kept tokens
        target.rewind(base + 1 + n_accepted)  # cache keeps `last` and the accepted drafts
        inside = min(k, len(_finish(kept, max_new_tokens - len(tokens), eos_token_id)))  # positions in the answer
        tokens += kept
        drafter.commit(kept, hidden)
        result.target_forwards += 1
        result.drafted += inside
        result.accepted += min(n_accepted, inside)
        for position in range(inside):
            result.drafted_per_position[position] += 1
            result.reached_per_position[position] += int(position <= n_accepted)
            result.accepted_per_position[position] += int(position < n_accepted)
    result.output_ids = _finish(tokens, max_new_tokens, eos_token_id)
    return result


def decode_speculative_tree(target: LlamaEngine, prefill: EngineOutput, drafter: TreeDrafter, depth: int,
                            max_new_tokens: int, eos_token_id: int | None, sampler: Sampler) -> Decoded:  # fmt: skip
    """Tree verification: the target runs [last] + the draft tree in one forward (`step_tree`), keeps a path
    of drafts (`_accept_tree`) and then its own token after the path; the cache keeps the path (`keep`).
    Per-position counts are per tree depth 1..`depth` (the drafter's trees are no deeper): depth d was
    reached when the path got to depth d - 1 and the tree has a draft below it there.
    """
    tokens = [int(sampler.pick(prefill.logits[:, -1]))]
    result = Decoded(tokens, drafted_per_position=[0] * depth, reached_per_position=[0] * depth,
                     accepted_per_position=[0] * depth)  # fmt: skip
    drafter.start(tokens[0], prefill.hidden[0, -1])
    while not _done(tokens, max_new_tokens, eos_token_id):
        draft_ids, parents = drafter.propose_tree()
        verify_ids = torch.cat([host_to_device([tokens[-1]], target.device), draft_ids.to(target.device)])
        nodes = [-1, *[parent + 1 for parent in parents]]  # node 0 is `last`, node j + 1 is draft j
        out = target.step_tree(verify_ids[None], nodes)
        depths, children = [0] * len(nodes), [[] for _ in nodes]
        for node in range(1, len(nodes)):
            depths[node] = depths[nodes[node]] + 1
            children[nodes[node]].append(node)
        if max(depths) > depth:
            raise ValueError(f"the drafter proposed a tree of depth {max(depths)}, deeper than {depth}")
        path, kept = _accept_tree(out.logits[0], verify_ids, nodes, children, sampler)
        hidden = out.hidden[0, path].clone()  # the states whose laws chose the kept tokens
        target.keep(path)
        inside = min(max(depths), len(_finish(kept, max_new_tokens - len(tokens), eos_token_id)))
        tokens += kept
        drafter.commit(kept, hidden)
        result.target_forwards += 1
        result.drafted += sum(1 <= node_depth <= inside for node_depth in depths)
        result.accepted += min(len(path) - 1, inside)
        for level in range(1, inside + 1):
            below = level - 1 < len(path) and bool(children[path[level - 1]])
            result.drafted_per_position[level - 1] += 1
            result.reached_per_position[level - 1] += int(below)
            result.accepted_per_position[level - 1] += int(level < len(path))
    result.output_ids = _finish(tokens, max_new_tokens, eos_token_id)
    return result


def _accept_tree(logits: torch.Tensor, ids: torch.Tensor, parents: list[int], children: list[list[int]],
                 sampler: Sampler) -> tuple[list[int], list[int]]:  # fmt: skip
    """The accepted path (node indices from the root, node 0 = the last committed token) and the kept tokens
    (the path's drafts, then the target's own token after it). Row i of `logits` [n, V] is the target's
    prediction after node i; `children[i]` lists node i's children in the order they are tested.

    Greedy: down to the child equal to the target's argmax while there is one. Sampling (module docstring):
    at each node the children are tested in order, child x accepted with probability p'(x), where p' is
    the target's law there with the siblings rejected before x removed and renormalised; if none is
    accepted, the target's token is drawn from that last p'. One host synchronisation per walk, and
    one for the token drawn.
    """
    if sampler.greedy:
        host_ids, choices = torch.stack([ids, logits.argmax(-1)]).tolist()
        path = [0]
        while agreeing := [child for child in children[path[-1]] if host_ids[child] == choices[path[-1]]]:
            path.append(agreeing[0])
        return path, [host_ids[node] for node in path[1:]] + [choices[path[-1]]]
    p = sampler.probabilities(logits)  # [n, V]
    parent_rows = host_to_device([max(parent, 0) for parent in parents], p.device)
    node_probs = p[parent_rows, ids]  # each node's token under the target's law after its parent
    host_ids, node_probs, uniforms = torch.stack([ids.double(), node_probs.double(),
                                                  sampler.uniform(len(parents), p.device).double()]).tolist()  # fmt: skip
    path = [0]
    while True:
        accepted, rejected, remaining = None, [], 1.0  # p' is p / remaining outside the rejected ids
        for child in children[path[-1]]:
            if host_ids[child] in rejected:  # a repeated sibling: its mass is already out of p'
                continue
            if remaining > 0 and uniforms[child] * remaining < node_probs[child]:
                accepted = child
                break
            remaining -= node_probs[child]
            rejected.append(host_ids[child])
        if accepted is None:  # a leaf, or every child rejected
            break
        path.append(accepted)
    law = p[path[-1]]
    if rejected:  # every child rejected: the target's token from p without them (p itself if rounding left none)
        residual = law.index_fill(0, host_to_device([int(i) for i in rejected], p.device), 0.0)
        law = torch.where(residual.sum() > 0, residual, law)
    path_ids = [int(host_ids[node]) for node in path[1:]]
    return path, path_ids + [int(sampler.draw(law))]


def _accept(logits: torch.Tensor, draft_ids: torch.Tensor, draft_probs: torch.Tensor | None,
            sampler: Sampler) -> tuple[int, int]:  # fmt: skip
    """Number of drafts kept and the target's own next token (see the module docstring, step 3).

    Row i of `logits` [k + 1, V] is the target's prediction after verify_ids[i], i.e. for the
    position of draft i + 1; row k follows the last draft (the bonus when all k are kept).
    """
    k = len(draft_ids)
    if sampler.greedy:
        choices = logits.argmax(-1)  # [k + 1]
        agree = (choices[:k] == draft_ids).long()
        n_accepted = int(agree.cumprod(0).sum())  # the one host sync of the cycle
        return n_accepted, int(choices[n_accepted])
    p = sampler.probabilities(logits)  # [k + 1, V], the target's law at each position
    rows = torch.arange(k, device=p.device)
    ratio = p[rows, draft_ids] / draft_probs[rows, draft_ids]  # q > 0: the draft drew these ids from q
    keep = sampler.uniform(k, p.device) < ratio  # accept draft i with probability min(1, p / q)
    n_accepted = int(keep.long().cumprod(0).sum())
    if n_accepted == k:
        return k, int(sampler.draw(p[k]))
    residual = (p[n_accepted] - draft_probs[n_accepted]).clamp_min(0)
    mass = residual.sum()
    # p == q makes a rejection impossible in exact arithmetic; if rounding made one, p itself is the law
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p[n_accepted])
    return n_accepted, int(sampler.draw(residual))
