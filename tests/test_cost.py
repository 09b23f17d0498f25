"""The cost model composes from per-position conditional acceptance, as a decoder really accepts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from evspec.speculative.cost import conditional_acceptance, expected_tokens_per_cycle, predicted_decode_speedup
from evspec.speculative.summary import summarize


def _cycles(rates: list[float], n: int, seed: int = 0) -> np.ndarray:
    """Accepted drafts per cycle when draft i is accepted with probability rates[i] once 1..i-1 were."""
    uniform = np.random.default_rng(seed).random((n, len(rates)))
    return np.cumprod(uniform < np.asarray(rates), axis=1).sum(axis=1)


def test_tokens_per_cycle_follows_the_conditional_rates_not_alpha():
    accepted = _cycles([0.8] * 4, 200_000)
    counts = [int((accepted >= i).sum()) for i in range(1, 5)]  # cycles accepting >= i drafts
    reached = [len(accepted), *counts[:-1]]  # cycles accepting >= i - 1 drafts
    rates = conditional_acceptance(counts, reached)
    produced = float(np.mean(accepted + 1))  # what the decoder yields per cycle
    assert expected_tokens_per_cycle(rates) == pytest.approx(produced)  # an identity on the same cycles
    assert produced == pytest.approx(1 + 0.8 + 0.8**2 + 0.8**3 + 0.8**4, abs=0.01)  # 3.36
    alpha = accepted.sum() / (4 * len(accepted))
    independent = (1 - alpha**5) / (1 - alpha)  # the formula the old cost model used: 2.27, far off
    assert independent == pytest.approx(2.27, abs=0.01) and abs(independent - produced) > 1.0


def test_rates_differ_by_position_and_unreached_positions_add_nothing():
    rates = conditional_acceptance([90, 45, 0, 0], [100, 90, 45, 0])
    assert rates == [0.9, 0.5, 0.0, None]
    assert expected_tokens_per_cycle(rates) == pytest.approx(1 + 0.9 + 0.45)
    # cycle cost: 4 drafts at c = 0.1 plus a verify of 1.2 steps
    assert predicted_decode_speedup(rates, 0.1, 1.2) == pytest.approx(2.35 / 1.6)


def _row(method: str, k: int, decode_ms: float, new_tokens: int, **extra) -> dict:
    return {"sample_id": "s/0", "method": method, "k": k, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
            "output_ids": list(range(new_tokens)), "new_tokens": new_tokens, "target_forwards": new_tokens,
            "drafted": 0, "accepted": 0, "accepted_per_position": [], "reached_per_position": [],
            "drafted_per_position": [], "ttft_ms": 10.0,
            "draft_setup_ms": 0.0, "decode_ms": decode_ms, "total_ms": 10.0 + decode_ms, "device": "cpu",
            "overlapped": False, "status": "ok", "exact_match": True, "draft_token_ms": None,
            "target_step_ms": None, "verify_ms": None, **extra}  # fmt: skip


def test_decode_phase_speedup_excludes_the_drafters_setup_and_matches_the_prediction(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "token").mkdir()
    pd.DataFrame([_row("target", 0, decode_ms=90.0, new_tokens=10)]).to_parquet(tmp_path / "target/shard-0.parquet")
    # 9 decode tokens in 3 cycles of 2 drafts (accepted 2, 2, 2: tokens per cycle 3); each cycle costs
    # 2 draft tokens at 2 ms + a 12 ms verify = 16 ms; the draft's own set-up (40 ms) is not decode time
    token = _row("token", 2, decode_ms=48.0, new_tokens=10, target_forwards=4, drafted=6, accepted=6,
                 accepted_per_position=[3, 3], reached_per_position=[3, 3], drafted_per_position=[3, 3],
                 draft_setup_ms=40.0,
                 total_ms=98.0, draft_token_ms=2.0, target_step_ms=10.0, verify_ms=12.0)  # fmt: skip
    pd.DataFrame([token]).to_parquet(tmp_path / "token/shard-0.parquet")
    summary = summarize(tmp_path, tmp_path / "summary.json", clips_path=tmp_path / "clips.parquet")
    entry = next(m for m in summary["methods"] if m["method"] == "token")
    assert entry["accepted_drafts"] == 6 and entry["drafted"] == 6 and entry["alpha"] == 1.0
    clips = pd.read_parquet(tmp_path / "clips.parquet").set_index("method")
    assert clips.loc["token", "speedup"] == pytest.approx(100 / 98) and clips.loc["target", "speedup"] == 1.0
    assert clips.loc["token", "tokens_per_forward"] == 2.5 and list(clips.loc["token", "output_ids"]) == list(range(10))
    assert entry["decode_speedup_median"] == pytest.approx((90 / 9) / (48 / 9))  # 1.875
    assert entry["predicted_decode_speedup"] == pytest.approx(3 / (2 * 0.2 + 1.2))  # the same quantity: 1.875
    assert entry["speedup_median"] == pytest.approx(100 / 98)  # end to end, set-up included
    assert entry["tokens_per_cycle"] == 3.0 and entry["tau"] == 2.5


def test_each_methods_k_is_chosen_on_the_selection_split_by_its_median_speedup(tmp_path):
    """The k with the highest median speedup on the selection split's clips, lossless runs only."""
    from evspec.speculative.summary import select_k

    rows = []
    for clip, target_ms in enumerate([100.0, 100.0, 100.0]):
        rows.append({**_row("target", 0, 90.0, 10), "sample_id": f"s/{clip}", "total_ms": target_ms})
        for k, ms in ((2, [50.0, 60.0, 200.0]), (4, [40.0, 70.0, 80.0]), (6, [10.0, 10.0, 10.0])):
            rows.append({**_row("token", k, 40.0, 10), "sample_id": f"s/{clip}", "total_ms": ms[clip],
                         "exact_match": k != 6})  # k = 6 is fastest but not lossless: not a candidate
    for method in ("target", "token"):
        (tmp_path / method).mkdir()
        pd.DataFrame([r for r in rows if r["method"] == method]).to_parquet(tmp_path / method / "shard-0.parquet")
    selection = select_k(tmp_path, "val")
    # medians: k = 2 -> median(2.0, 1.67, 0.5) = 1.67; k = 4 -> median(2.5, 1.43, 1.25) = 1.43
    assert selection["k"] == {"token": 2} and selection["n_clips"] == 3 and selection["split"] == "val"
    assert selection["speedup_median"]["token"] == pytest.approx({2: 100 / 60, 4: 100 / 70})
