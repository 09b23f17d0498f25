"""`python -m evspec spec-summary`: per method and k, what the shards measured, with intervals.

For each (method, k), over the clips every method answered (definitions of alpha, the
conditional per-position acceptance, tokens per cycle, c, v and the cost model are in
`evspec.speculative.cost`, stated once):
- speedup: target total_ms / method total_ms per clip (end to end: vision, prefill, the
  drafter's set-up, decode); median and a bootstrap 95% interval of the median;
- decode-phase speedup: the target's decode ms per token / the method's, per clip (clips
  with answers of at least two tokens), median and interval: the quantity the cost model
  predicts, E / (k c + v) from this run's acceptance counts and unit costs;
- tau: new tokens per target forward, the prefill forward and the bonus tokens counted;
- acceptance: counts per draft position, alpha, conditional per-position acceptance,
  tokens per cycle;
- lossless: greedy, the share of clips whose ids equal the target's and the first
  divergence; sampling, the distribution test of `evspec.speculative.lossless` on the repeated
  draws (and on EventGPT alone, the negative control);
- per question type (given the data stage's manifest): the same speedup, median and interval,
  over that type's clips, and the target's answer length there (answers of different types
  differ in length, and the length decides what drafting can save);
- the sweeps (given speculate's runs on swept event windows, tree shapes or edge-cloud links): per value, method
  and k, the same speedup (against the target in the same run), tau, alpha with its counts and losslessness,
  beside the main run's numbers at its own value; over a link also what crossed it per answer, and per method
  and k the break-even round trip: where its speedup over the target behind the same link falls to 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from evspec.atomic import atomic_output
from evspec.errors import InputError
from evspec.speculative.cost import conditional_acceptance, expected_tokens_per_cycle, predicted_decode_speedup
from evspec.speculative.lossless import DRAFT_ALONE, lossless_test
from evspec.speculative.names import AHEAD_COUNTS, CASCADE_COUNTS, LINK_COUNTS

BOOTSTRAP_SAMPLES = 2000


def bootstrap_median_interval(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median."""
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(values, size=(BOOTSTRAP_SAMPLES, len(values)), replace=True), axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def summarize(spec_dir: Path, out_path: Path, manifest_path: Path | None = None, clips_path: Path | None = None,
              selection_dir: Path | None = None, selection_split: str = "val",
              window_dirs: dict[int, Path] | None = None, tree_dirs: dict[tuple[int, int], Path] | None = None,
              tree_shape: tuple[int, int] | None = None, link_dirs: dict[int, Path] | None = None) -> dict:  # fmt: skip
    """`manifest_path`: the data stage's manifest, whose question types split the speedups (optional);
    `clips_path`: where to write the per-clip table (`clip_table`); `selection_dir`: speculate's output on
    another split, where each method's k is chosen (`select_k`); `window_dirs`: speculate's output per swept
    event window (ms -> directory), `tree_dirs` per swept tree shape ((top-k, nodes) -> directory; the main
    run's is `tree_shape`), `link_dirs` per edge-cloud round trip (ms -> directory; the main run, on one machine,
    stands at 0): `sweep`, `break_even`."""
    question_types = manifest = None
    if manifest_path is not None:
        manifest = pd.read_parquet(manifest_path, columns=["sample_id", "question_type", "question"])
        question_types = manifest.set_index("sample_id")["question_type"]
    paths = sorted(path for path in spec_dir.glob("*/shard-*.parquet") if path.parent.name != "lossless")
    if not paths:
        raise InputError(spec_dir, "no {method}/shard-*.parquet files: run `python -m evspec speculate` first")
    rows = _read_shards(paths)
    draws_paths = sorted(spec_dir.glob("lossless/shard-*.parquet"))
    draws = pd.concat([pd.read_parquet(path) for path in draws_paths], ignore_index=True) if draws_paths else None
    target = rows[rows["method"] == "target"].set_index("sample_id")
    if target.empty:
        raise ValueError(f"{spec_dir}: no rows of the target method, the baseline of every speedup")
    greedy = float(target["temperature"].iloc[0]) == 0.0
    summary = {"n_clips": int(target.index.nunique()), "device": str(target["device"].iloc[0]),
               "dtype": str(target["dtype"].iloc[0]) if "dtype" in target else "float32",
               "temperature": float(target["temperature"].iloc[0]), "top_k": int(target["top_k"].iloc[0]),
               "top_p": float(target["top_p"].iloc[0]), "greedy": greedy,
               "target_decode_ms_per_token": _median(_decode_ms_per_token(target)),
               "answer_tokens": _quantiles(target["new_tokens"]),
               "tau_definition": "new tokens / target forwards, counting the prefill and the bonus tokens",
               "methods": []}  # fmt: skip
    if draws is not None and not draws.empty:
        summary["lossless_control"] = lossless_test(draws, DRAFT_ALONE, 0)
    for (method, k), group in rows.groupby(["method", "k"], sort=False):
        entry = {"method": method, "k": int(k), "n_clips": int(len(group))}
        summary["methods"].append(entry)
        ran = group[group["status"] == "ok"]
        if ran.empty:
            entry["status"] = str(group["status"].iloc[0])
            continue
        joined = ran.merge(target[["total_ms", "decode_ms", "new_tokens", "output_ids"]], left_on="sample_id",
                           right_index=True, suffixes=("", "_target")).set_index("sample_id")  # fmt: skip
        speedup = _speedup(joined)
        entry.update(status="ok", **_median_and_interval("speedup", speedup),
                     ttft_ms_median=_median(ran["ttft_ms"]), draft_setup_ms_median=_median(ran["draft_setup_ms"]),
                     total_ms_median=float(ran["total_ms"].median()), tau=_tau(ran))  # fmt: skip
        decode_speedup = (_decode_ms_per_token(joined, "_target") / _decode_ms_per_token(joined)).dropna().to_numpy()
        if question_types is not None:
            entry["by_question_type"] = _by_question_type(joined, speedup, question_types)
        if method != "target" and len(decode_speedup):
            entry.update(_median_and_interval("decode_speedup", decode_speedup))
        if greedy:
            entry.update(exact_match_rate=_exact_match_rate(joined), first_divergence=_first_divergence(joined))
        elif draws is not None and method != "target":
            entry["lossless_test"] = lossless_test(draws, method, int(k))
        if ran["drafted"].sum() > 0:
            entry.update(_acceptance(ran))
        sources = [c for c in ran.columns if c.startswith("accepted_from_") and ran[c].notna().any()]
        if sources:  # hybrid: accepted drafts by the drafter that proposed them
            entry["accepted_by_source"] = {c.removeprefix("accepted_from_"): int(ran[c].sum()) for c in sources}
        if "eventgpt_forwards" in ran and ran["eventgpt_forwards"].notna().any():
            entry["cascade"] = _cascade_stages(ran)
    if selection_dir is not None:
        summary["selection"] = select_k(selection_dir, selection_split)
    if window_dirs:
        own_ms = None if manifest is None else _event_window_ms(manifest_path)
        summary["event_window_sweep"] = sweep({(ms,): d for ms, d in window_dirs.items()}, ("window_ms",), (own_ms,),
                                              summary["methods"], question_types)  # fmt: skip
    if tree_dirs:
        summary["tree_sweep"] = sweep(tree_dirs, ("tree_top_k", "tree_nodes"), tree_shape, summary["methods"],
                                      question_types)  # fmt: skip
    if link_dirs:
        summary["link_sweep"] = sweep({(rtt,): d for rtt, d in link_dirs.items()}, ("rtt_ms",), (0,), summary["methods"],
                                      question_types)  # fmt: skip
        summary["link_break_even"] = break_even(summary["link_sweep"])
    with atomic_output(out_path) as temporary:
        temporary.write_text(json.dumps(summary, indent=2))
    if clips_path is not None:
        with atomic_output(clips_path) as temporary:
            clip_table(rows, manifest).to_parquet(temporary, index=False)
    return summary


CLIP_COLUMNS = ["sample_id", "question_type", "question", "method", "k", "answer_text", "output_ids", "new_tokens",
                "target_forwards", "tokens_per_forward", "drafted", "accepted", "ttft_ms", "draft_setup_ms",
                "decode_ms", "total_ms", "speedup"]  # fmt: skip


def clip_table(rows: pd.DataFrame, manifest: pd.DataFrame | None) -> pd.DataFrame:
    """One row per clip and (method, k) that ran: the question, the answer as text and ids, the target
    forwards and tokens per forward, the drafts, the times, and the speedup over the target on that clip."""
    ran = rows[rows["status"] == "ok"].copy()
    target_ms = ran[ran["method"] == "target"].set_index("sample_id")["total_ms"]
    ran["speedup"] = ran["sample_id"].map(target_ms) / ran["total_ms"]
    ran["tokens_per_forward"] = ran["new_tokens"] / ran["target_forwards"].where(lambda n: n > 0)
    if manifest is not None:
        ran = ran.merge(manifest, on="sample_id", how="left")
    for column in CLIP_COLUMNS:
        if column not in ran:
            ran[column] = None
    return ran[CLIP_COLUMNS].sort_values(["method", "k", "sample_id"]).reset_index(drop=True)


def _read_shards(paths: list[Path]) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(path) for path in paths], ignore_index=True)


def _speedup(joined: pd.DataFrame) -> np.ndarray:
    """Per clip: the target alone's end-to-end time over the method's (the one definition of speedup)."""
    return (joined["total_ms_target"] / joined["total_ms"]).to_numpy()


def select_k(selection_dir: Path, split: str) -> dict:
    """Each method's k with the highest median speedup on another split's clips (its lossless runs only):
    the k the report ranks the method at on the evaluated split, so the choice is not fitted to the clips
    it is scored on. {"split", "n_clips", "k": {method: k}, "speedup_median": {method: {k: median}}}."""
    paths = sorted(path for path in selection_dir.glob("*/shard-*.parquet") if path.parent.name != "lossless")
    rows = _read_shards(paths) if paths else pd.DataFrame(columns=["method", "status"])
    ran = rows[rows["status"] == "ok"]
    target = ran[ran["method"] == "target"].set_index("sample_id")
    medians: dict[str, dict[int, float]] = {}
    for (method, k), group in ran[ran["method"] != "target"].groupby(["method", "k"]):
        if "exact_match" in group and group["exact_match"].notna().all() and not group["exact_match"].all():
            continue  # a k whose answers differ from the target's is not a candidate
        joined = group.merge(target[["total_ms"]], left_on="sample_id", right_index=True, suffixes=("", "_target"))
        if len(joined):
            medians.setdefault(method, {})[int(k)] = float(np.median(_speedup(joined)))
    return {"split": split, "n_clips": int(target.index.nunique()),
            "k": {method: max(by_k, key=by_k.get) for method, by_k in medians.items()}, "speedup_median": medians}


SWEEP_FIELDS = ("method", "k", "n_clips", "speedup_median", "speedup_ci95", "tau", "alpha", "accepted_drafts",
                "drafted", "tokens_per_cycle", "exact_match_rate", "link", "by_question_type")  # fmt: skip


def sweep(runs: dict[tuple, Path], labels: tuple[str, ...], own: tuple | None, own_entries: list[dict],
          question_types: pd.Series | None = None) -> list[dict]:  # fmt: skip
    """A sweep of one setting (`labels` name its fields; `runs` maps each value to speculate's output there): per
    value, method and k, the speedup over the target of the same run (median, interval; per question type too,
    given `question_types`), tau, alpha with its counts and the greedy exact-match rate; then the main run's
    entries for those methods and k at its own value `own` (marked `own`)."""
    entries = []
    for value, directory in sorted(runs.items()):
        paths = sorted(path for path in directory.glob("*/shard-*.parquet") if path.parent.name != "lossless")
        if not paths:
            raise InputError(directory, "no {method}/shard-*.parquet files of the sweep's run")
        rows = _read_shards(paths)
        ran = rows[rows["status"] == "ok"]
        target = ran[ran["method"] == "target"].set_index("sample_id")
        for (method, k), group in ran[ran["method"] != "target"].groupby(["method", "k"], sort=False):
            joined = group.merge(target[["total_ms", "output_ids", "new_tokens"]], left_on="sample_id",
                                 right_index=True, suffixes=("", "_target")).set_index("sample_id")  # fmt: skip
            greedy = float(group["temperature"].iloc[0]) == 0.0
            speedup = _speedup(joined)
            entry = {"method": method, "k": int(k), "n_clips": len(joined), "tau": _tau(group),
                     **_median_and_interval("speedup", speedup),
                     "exact_match_rate": _exact_match_rate(joined) if greedy else None}  # fmt: skip
            if question_types is not None:
                entry["by_question_type"] = _by_question_type(joined, speedup, question_types)
            if group["drafted"].sum() > 0:
                entry.update(_acceptance(group))
            if LINK_COUNTS[0] in group and group[LINK_COUNTS[0]].notna().any():
                entry["link"] = _link_traffic(group, target)
            entries.append({**dict(zip(labels, value)), "own": False, **{f: entry.get(f) for f in SWEEP_FIELDS}})
    swept = {(e["method"], e["k"]) for e in entries}
    entries += [{**dict(zip(labels, own or (None,) * len(labels))), "own": True, **{f: e.get(f) for f in SWEEP_FIELDS}}
                for e in own_entries if (e["method"], e["k"]) in swept and e.get("status") == "ok"]  # fmt: skip
    return sorted(entries, key=lambda e: (e["method"], e["k"], *(e[label] or 0 for label in labels)))


def _link_traffic(group: pd.DataFrame, target: pd.DataFrame) -> dict:
    """Per answer over the link (medians): messages and bytes each way, and the target's bytes down; with drafting
    ahead, the drafts made while a verify was away that the next cycle proposed (hits / cycles drafted ahead)."""
    out = {column: float(group[column].median()) for column in LINK_COUNTS}
    out.update(bandwidth_mbit_s=float(group["link_bandwidth_mbit_s"].iloc[0]),
               target_bytes_down=float(target["link_bytes_down"].median()))
    if AHEAD_COUNTS[0] in group and group[AHEAD_COUNTS[0]].notna().any():
        totals = {column: int(group[column].sum()) for column in AHEAD_COUNTS}
        out.update(totals, ahead_hit_rate=totals["ahead_hits"] / max(totals["ahead_cycles"], 1))
    return out


def break_even(link_sweep: list[dict]) -> list[dict]:
    """Per method and k over the swept links (not the main run's one machine): the round trip (ms) at which the
    median speedup over the target behind the same link falls to 1, interpolated linearly between the swept round
    trips around the crossing; None where it never falls below 1 after being at or above it inside the sweep
    (`faster_at_rtt_ms` lists the round trips where it is at least 1)."""
    out = []
    by_variant: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for entry in link_sweep:
        if not entry["own"]:
            by_variant.setdefault((entry["method"], entry["k"]), []).append((entry["rtt_ms"], entry["speedup_median"]))
    for (method, k), points in sorted(by_variant.items()):
        points.sort()
        crossing = None
        for (rtt_a, speedup_a), (rtt_b, speedup_b) in zip(points, points[1:]):
            if speedup_a >= 1 > speedup_b:
                crossing = rtt_a + (speedup_a - 1) * (rtt_b - rtt_a) / (speedup_a - speedup_b)
                break
        out.append({"method": method, "k": k, "break_even_rtt_ms": crossing, "swept_rtt_ms": [r for r, _ in points],
                    "faster_at_rtt_ms": [r for r, speedup in points if speedup >= 1]})  # fmt: skip
    return out


def _event_window_ms(manifest_path: Path) -> int:
    """The draft's own window, from the manifest's event spans (the median, in whole ms)."""
    spans = pd.read_parquet(manifest_path, columns=["event_start_us", "event_end_us"])
    return int(round(float((spans["event_end_us"] - spans["event_start_us"]).median()) / 1000))


def _median_and_interval(name: str, values: np.ndarray) -> dict:
    """{name}_median and {name}_ci95: the median and its 95% bootstrap interval."""
    return {f"{name}_median": float(np.median(values)), f"{name}_ci95": bootstrap_median_interval(values)}


def _by_question_type(joined: pd.DataFrame, speedup: np.ndarray, question_types: pd.Series) -> dict:
    """Per question type: clips, the speedup's median and interval, the target's median answer length."""
    types = question_types.reindex(joined.index).fillna("unknown").to_numpy()
    out = {}
    for question_type in sorted(set(types)):
        chosen = types == question_type
        out[question_type] = {"n_clips": int(chosen.sum()), **_median_and_interval("speedup", speedup[chosen]),
                              "target_answer_tokens_median": float(joined["new_tokens_target"][chosen].median())}  # fmt: skip
    return out


def _acceptance(ran: pd.DataFrame) -> dict:
    """Counts per draft position, alpha, n-alpha, tokens per cycle, and the cost model's prediction."""
    def pooled(column: str) -> list[int]:
        return np.sum(np.stack(ran[column].to_numpy()), axis=0).astype(int).tolist()

    accepted, reached = pooled("accepted_per_position"), pooled("reached_per_position")
    conditional = conditional_acceptance(accepted, reached)
    out = {"cycles": reached[0], "reached_by_position": reached, "accepted_by_position": accepted,
           "alpha": float(ran["accepted"].sum() / ran["drafted"].sum()),
           "accepted_drafts": int(ran["accepted"].sum()), "drafted": int(ran["drafted"].sum()),  # alpha's counts
           "conditional_acceptance_by_position": conditional,
           "tokens_per_cycle": expected_tokens_per_cycle(conditional)}  # fmt: skip
    if ran["target_step_ms"].notna().any():
        step = float(ran["target_step_ms"].median())
        c, v = float(ran["draft_token_ms"].median()) / step, float(ran["verify_ms"].median()) / step
        out.update(cost_ratio=c, verify_ratio=v, predicted_decode_speedup=predicted_decode_speedup(conditional, c, v))
    return out


def _exact_match_rate(joined: pd.DataFrame) -> float:
    """The share of clips whose ids equal the target's (greedy: lossless means all of them)."""
    return float(np.mean([list(a) == list(b) for a, b in zip(joined["output_ids"], joined["output_ids_target"])]))


def _cascade_stages(ran: pd.DataFrame) -> dict:
    """`cascade`'s first stage: prompt lookup's guesses EventGPT kept, and EventGPT's drafts per forward."""
    total = {column: int(ran[column].sum()) for column in CASCADE_COUNTS}
    return {**total, "lookup_acceptance": total["lookup_accepted"] / max(total["lookup_drafted"], 1),
            "eventgpt_drafts_per_forward": total["eventgpt_drafts"] / max(total["eventgpt_forwards"], 1)}


def _decode_ms_per_token(frame: pd.DataFrame, suffix: str = "") -> pd.Series:
    """Decode-phase ms per token after the first (NaN for one-token answers and unseparable phases)."""
    return frame[f"decode_ms{suffix}"] / (frame[f"new_tokens{suffix}"] - 1).where(lambda n: n > 0)


def _quantiles(series: pd.Series) -> dict:
    return {"median": float(series.median()), "p10": float(series.quantile(0.1)), "p90": float(series.quantile(0.9)),
            "total": int(series.sum())}  # fmt: skip


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
