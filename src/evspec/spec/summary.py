"""`python -m evspec spec-summary`: per method and k, what the shards measured, with intervals.

For each (method, k), over the clips every method answered:
- speedup: target total_ms / method total_ms per clip; median and a bootstrap 95% interval
  of the median (also for the decode phase alone, total - ttft);
- tau: new tokens per target forward, the prefill forward and the bonus tokens counted;
- alpha: accepted / drafted; per-position acceptance, both unconditional (accepted at i /
  cycles) and prefix-conditioned (accepted at i / accepted at i - 1);
- lossless: the share of clips whose output ids equal the target's, and the first divergence;
- predicted speedup from the cost model, E(alpha, k) / (k c + 1), with c the measured cost of
  one draft token relative to one target step, next to the measured decode speedup.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from evspec.adapter.metrics import expected_tokens_per_cycle
from evspec.atomic import atomic_output
from evspec.errors import InputError

BOOTSTRAP_SAMPLES = 2000


def bootstrap_median_interval(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median."""
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(values, size=(BOOTSTRAP_SAMPLES, len(values)), replace=True), axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def summarize(spec_dir: Path, out_path: Path) -> dict:
    paths = sorted(spec_dir.glob("*/shard-*.parquet"))
    if not paths:
        raise InputError(spec_dir, "no {method}/shard-*.parquet files: run `python -m evspec speculate` first")
    rows = pd.concat([pd.read_parquet(path) for path in paths], ignore_index=True)
    target = rows[rows["method"] == "target"].set_index("sample_id")
    if target.empty:
        raise ValueError(f"{spec_dir}: no rows of the target method, the baseline of every speedup")
    target_step_ms = float(np.median((target["total_ms"] - target["ttft_ms"]) / (target["target_forwards"] - 1).clip(lower=1)))
    summary = {"n_clips": int(target.index.nunique()), "device": str(target["device"].iloc[0]),
               "temperature": float(target["temperature"].iloc[0]), "target_step_ms": target_step_ms,
               "tau_definition": "new tokens / target forwards, counting the prefill and the bonus tokens",
               "methods": []}  # fmt: skip
    for (method, k), group in rows.groupby(["method", "k"], sort=False):
        entry = {"method": method, "k": int(k), "n_clips": int(len(group))}
        ran = group[group["status"] == "ok"]
        if ran.empty:
            entry["status"] = str(group["status"].iloc[0])
            summary["methods"].append(entry)
            continue
        joined = ran.merge(target[["total_ms", "ttft_ms", "output_ids"]], left_on="sample_id", right_index=True,
                           suffixes=("", "_target")).set_index("sample_id")
        speedup = (joined["total_ms_target"] / joined["total_ms"]).to_numpy()
        entry.update(status="ok", speedup_median=float(np.median(speedup)),
                     speedup_ci95=bootstrap_median_interval(speedup), ttft_ms_median=_median(ran["ttft_ms"]),
                     total_ms_median=float(ran["total_ms"].median()),
                     tau=_tau(ran),
                     exact_match_rate=float(np.mean([list(a) == list(b) for a, b in
                                                     zip(joined["output_ids"], joined["output_ids_target"])])),
                     first_divergence=_first_divergence(joined))  # fmt: skip
        decode = joined["total_ms"] - joined["ttft_ms"]
        if decode.notna().all() and method != "target":
            decode_speedup = ((joined["total_ms_target"] - joined["ttft_ms_target"]) / decode).to_numpy()
            entry["decode_speedup_median"] = float(np.median(decode_speedup))
        if ran["drafted"].sum() > 0:
            accepted = np.sum(np.stack(ran["accepted_per_position"].to_numpy()), axis=0)
            drafted = np.sum(np.stack(ran["drafted_per_position"].to_numpy()), axis=0)
            alpha = float(ran["accepted"].sum() / ran["drafted"].sum())
            previous = np.concatenate([[drafted[0]], accepted[:-1]])
            entry.update(alpha=alpha, acceptance_by_position=(accepted / drafted).tolist(),
                         conditional_acceptance_by_position=(accepted / np.maximum(previous, 1)).tolist())  # fmt: skip
            if "cost_ratio" in ran and ran["cost_ratio"].notna().any():
                cost = float(ran["cost_ratio"].median())
                entry.update(cost_ratio=cost, predicted_decode_speedup=predicted_speedup(alpha, int(k), cost))
        summary["methods"].append(entry)
    with atomic_output(out_path) as temporary:
        temporary.write_text(json.dumps(summary, indent=2))
    return summary


def predicted_speedup(alpha: float, k: int, cost_ratio: float) -> float:
    """The cost model: expected tokens per cycle over the cycle's cost in target steps."""
    return expected_tokens_per_cycle(alpha, k) / (k * cost_ratio + 1)


def _tau(ran: pd.DataFrame) -> float | None:
    """New tokens per target forward, or None where the forwards were not counted."""
    if ran["target_forwards"].isna().any():
        return None
    return float(ran["new_tokens"].sum() / max(ran["target_forwards"].sum(), 1))


def _median(series: pd.Series) -> float | None:
    return None if series.isna().all() else float(series.median())


def _first_divergence(joined: pd.DataFrame) -> dict | None:
    for sample_id, row in joined.iterrows():
        ours, theirs = list(row["output_ids"]), list(row["output_ids_target"])
        if ours != theirs:
            index = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            return {"sample_id": sample_id, "position": index}
    return None
