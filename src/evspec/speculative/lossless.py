"""Is a sampled method's output law the target's? A two-sample test on repeated draws.

Under sampling one answer per method proves nothing: two lossless decoders give different
samples. `speculate` draws the first n answer tokens of a few clips many times from every
method and from the target alone; here, per clip and answer position, the tokens the method
drew are compared with the target's by Pearson's chi-square test of homogeneity
(`scipy.stats.chi2_contingency`) on groups of ids holding at least `MIN_CELL_COUNT` draws of
the two samples together (so every expected count is at least about 5). A position past an
answer's end counts as its own cell. The p-values of all (clip, position) tests are combined
by Bonferroni: p = min(1, tests x smallest p), valid however the tests depend on each other.

A large p is consistent with lossless decoding (it cannot prove it); a small one says the
method's law differs from the target's. The same test on EventGPT's own answers
(`draft-alone`) is the negative control: it should reject, showing the draws can tell laws apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency

DRAFT_ALONE = "draft-alone"  # EventGPT answering alone: the negative control
MIN_CELL_COUNT = 10
ENDED = -1  # the answer ended before this position


def homogeneity_p_value(first: Sequence[int], second: Sequence[int]) -> float | None:
    """p-value that two samples of ids come from one distribution (None: fewer than two cells to compare).

    Cells are grouped, rarest first, until each group holds `MIN_CELL_COUNT` draws of the two
    samples together (the grouping reads only the pooled counts, which treat both samples alike).
    """
    counts_first, counts_second = Counter(first), Counter(second)
    cells = sorted(set(counts_first) | set(counts_second), key=lambda c: (counts_first[c] + counts_second[c], c))
    groups, current = [], np.zeros(2)
    for cell in cells:
        current = current + (counts_first[cell], counts_second[cell])
        if current.sum() >= MIN_CELL_COUNT:
            groups.append(current)
            current = np.zeros(2)
    if current.sum() and groups:
        groups[-1] = groups[-1] + current  # the leftover joins the last (largest) group
    table = np.array(groups).T  # [2, groups]
    if table.ndim != 2 or table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return None
    return float(chi2_contingency(table, correction=False).pvalue)


def lossless_test(draws: pd.DataFrame, method: str, k: int, reference: str = "target") -> dict | None:
    """Bonferroni-combined p over every (clip, position) of `method`/k's draws against the reference's."""
    mine = draws[(draws["method"] == method) & (draws["k"] == k)]
    theirs = draws[draws["method"] == reference]
    if mine.empty or theirs.empty:
        return None
    p_values = []
    n_tokens = int(max(len(ids) for ids in pd.concat([mine, theirs])["output_ids"]))
    for sample_id, group in mine.groupby("sample_id"):
        other = theirs[theirs["sample_id"] == sample_id]
        for position in range(n_tokens):
            p = homogeneity_p_value(_at(group["output_ids"], position), _at(other["output_ids"], position))
            if p is not None:
                p_values.append(p)
    if not p_values:
        return None
    return {"p_value": min(1.0, len(p_values) * min(p_values)), "tests": len(p_values),
            "clips": int(mine["sample_id"].nunique()), "draws_per_clip": int(mine.groupby("sample_id").size().min()),
            "tokens": n_tokens}  # fmt: skip


def _at(answers: pd.Series, position: int) -> list[int]:
    return [int(ids[position]) if position < len(ids) else ENDED for ids in answers]
