"""One sampling spec for both models: temperature, top-k, top-p, applied to logits the same way.

    probabilities = softmax(top_p(top_k(logits / temperature)))

in transformers' order (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper) and with
their tie rules, so `hf-generate` and this engine sample from the same law; a test holds the
two equal. Temperature 0 is greedy (argmax; top-k and top-p do not apply).

Speculative sampling is lossless only if the target's distribution p and the draft's q are
the distributions tokens were actually drawn from: the target warps its logits with this
spec, the draft warps its own (masked to the shared ids) with the same spec, and the
acceptance test reads both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSpec:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off; else keep the k most likely ids (ties at the k-th kept)
    top_p: float = 1.0  # 1: off; else the smallest set whose mass reaches top_p (at least one id)

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling spec {self}: temperature >= 0, top_k >= 0, 0 < top_p <= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """Float32 logits [..., V] after temperature, top-k and top-p (removed ids at -inf)."""
        scores = logits.float() / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            ascending, order = torch.sort(scores, dim=-1)
            removed = ascending.softmax(-1).cumsum(-1) <= 1 - self.top_p
            removed[..., -1] = False  # the most likely id always stays
            scores = scores.masked_fill(removed.scatter(-1, order, removed), float("-inf"))
        return scores

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.warp(logits), dim=-1)


def inverse_cdf(probabilities: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Ids [...] drawn from rows [..., V] of probabilities by inverting their CDF at uniforms [...] in [0, 1).

    The one way every draw is made (graph-capturable: the uniforms come from the caller's
    random stream before a replay). The CDF is accumulated in fp32 and its last value
    scales the uniform, so rows need not sum to exactly 1; ids without mass are never drawn.
    """
    cdf = probabilities.float().cumsum(-1)
    index = torch.searchsorted(cdf, uniforms[..., None].float() * cdf[..., -1:], right=True)
    last = cdf.argmax(-1, keepdim=True)  # the last id with mass: argmax returns the first maximum
    return torch.minimum(index, last).squeeze(-1)


@dataclass
class Sampler:
    """A spec and the random stream its draws come from (one per device that draws)."""

    spec: SamplingSpec = SamplingSpec()
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.spec.greedy

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return self.spec.probabilities(logits)

    def draw(self, probabilities: torch.Tensor) -> torch.Tensor:
        """One id per row of [..., V] probabilities (no host synchronisation)."""
        return inverse_cdf(probabilities, self.uniform(probabilities[..., 0].numel(), probabilities.device).view(
            probabilities.shape[:-1]))  # fmt: skip

    def uniform(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.rand(n, device=device, generator=self.generator)

    def tree_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities a draft tree ranks its candidates by: of the warped law when sampling (ids the spec
        removes score -inf and are never proposed), of the raw logits when greedy."""
        scores = logits.float()
        return (scores if self.greedy else self.spec.warp(scores)).log_softmax(-1)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1) if self.greedy else self.draw(self.probabilities(logits))

    def propose(self, logits: torch.Tensor, allowed: torch.Tensor | None, target_vocab: int):
        """A draft's id and, when sampling, its distribution q over the target's ids.

        `allowed` (bool [V_draft]) masks the draft to the shared ids before the spec applies;
        shared ids are the same id in both vocabularies, so q is q_draft zero-padded.
        """
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        if self.greedy:
            return logits.argmax(-1), None
        q = self.probabilities(logits)
        padded = q.new_zeros(*q.shape[:-1], target_vocab)
        width = min(q.shape[-1], target_vocab)
        padded[..., :width] = q[..., :width]
        return self.draw(q), padded
