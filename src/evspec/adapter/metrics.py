"""What an alignment is worth for decoding, not only its geometry.

For predicted target hidden states against the real ones (held-out clips only):
- cosine: mean, P10/P50/P90, and the fraction at or above 0.5, 0.6, ..., 0.95;
- top-1 agreement: the target's lm_head on the prediction picks the target's own token;
- implied greedy acceptance: the draft states are teacher-forced along the target's
  answer, so position i's agreement is conditioned on the correct prefix, which is
  exactly what verification checks. Per clip, a draft of the whole answer would keep
  its leading run of agreements; `accepted_prefix_fraction` averages run / length.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

COSINE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def alignment_metrics(predicted: list[torch.Tensor], actual: list[torch.Tensor], tokens: list[torch.Tensor],
                      lm_head: torch.nn.Linear) -> dict:  # fmt: skip
    """Per-clip lists of predicted/actual hidden states [L, H] and the tokens [L] they should give."""
    cosines = torch.cat([F.cosine_similarity(p, a, dim=-1) for p, a in zip(predicted, actual)]).numpy()
    agreements = [(lm_head(p).argmax(-1) == t) for p, t in zip(predicted, tokens)]
    runs = [int(torch.cumprod(a.long(), 0).sum()) / len(a) for a in agreements]
    flat = torch.cat(agreements).float()
    return {
        "cosine_mean": float(cosines.mean()),
        **{f"cosine_p{q}": float(np.percentile(cosines, q)) for q in (10, 50, 90)},
        **{f"cosine_at_least_{t}": float((cosines >= t).mean()) for t in COSINE_THRESHOLDS},
        "top1_agreement": float(flat.mean()),
        "accepted_prefix_fraction": float(np.mean(runs)),
        "n_tokens": int(flat.numel()),
    }
