"""The cost model of one speculative cycle, and the acceptance statistics it composes from.

Definitions (the reports quote these; nothing else computes them):

- A cycle drafts k tokens and verifies them in one target forward of k + 1 tokens; it yields
  the accepted drafts plus one token of the target's own (the bonus, or the correction).
- Only draft positions inside the answer count: a draft past the answer's end (after its `</s>`
  or its last allowed token) is verified but not needed, so it is neither accepted nor rejected.
- alpha = accepted drafts / drafted drafts, pooled over cycles.
- Conditional acceptance at position i (EAGLE's n-alpha): P(draft i accepted | drafts 1..i-1
  accepted) = cycles accepting draft i / cycles reaching it (drafts 1..i-1 accepted).
  Per-position rates differ (later drafts condition on more of the draft's own guesses), so
  alpha^i is not the chance of accepting i drafts: the independent formula
  (1 - alpha^(k+1)) / (1 - alpha) undercounts whenever early positions are easier.
- Tokens per cycle: E = 1 + sum_i prod_{j <= i} a_j, the mean of (accepted + 1) over cycles
  when every cycle needs all k positions (an identity then; the answer's last cycle may need fewer).
- c = one draft token's time / one target decode step's, where one draft token's time is one
  proposal of k drafts (with the commit of the tokens the target kept) / k: all the drafting a
  cycle costs, spread over its drafts; v(k) = one verify of k + 1 tokens / one target decode step.
- Decode-phase speedup = the target's decode time per token / the method's, decode phase
  only (after the first token; the drafter's own set-up, e.g. EventGPT's vision and prefill,
  is reported separately as `draft_setup_ms`). Predicted: E / (k c + v(k)).
"""

from __future__ import annotations

from collections.abc import Sequence


def conditional_acceptance(accepted_per_position: Sequence[int], reached_per_position: Sequence[int]) -> list[float | None]:
    """n-alpha per draft position from counts: cycles accepting draft i / cycles reaching it (None: never reached)."""
    return [float(a / r) if r else None for a, r in zip(accepted_per_position, reached_per_position)]


def expected_tokens_per_cycle(conditional_rates: Sequence[float | None]) -> float:
    """E = 1 + sum over i of the product of the first i conditional rates (a position never reached adds 0)."""
    survival, total = 1.0, 1.0
    for rate in conditional_rates:
        survival *= rate or 0.0
        total += survival
    return total


def predicted_decode_speedup(conditional_rates: Sequence[float | None], draft_over_step: float,
                             verify_over_step: float) -> float:  # fmt: skip
    """E / (k c + v): tokens per cycle over the cycle's cost in target decode steps."""
    k = len(conditional_rates)
    return expected_tokens_per_cycle(conditional_rates) / (k * draft_over_step + verify_over_step)
