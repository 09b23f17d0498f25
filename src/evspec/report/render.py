"""`python -m evspec report`: Markdown reports (Jinja) and PNG figures from the result files.

Every number in a report is read from a result file here and passed to a template; the
templates hold no numbers, and every section names the file and the command behind it.
Sections whose results a run did not produce (e.g. toy metrics on real checkpoints) say so.

    reports/{run}/index.md        the answer in one screen + what ran
    reports/{run}/data.md         clips, events per window, splits
    reports/{run}/stages.md       stage costs per model, 1 vs many images
    reports/{run}/alignment.md    adapter and draft-head metrics vs baselines
    reports/{run}/speculative.md  speedup, tau, alpha, acceptance per position, lossless check
    reports/{run}/clips.md        per clip: the speedup's spread, the best and worst clips of each method
"""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from evspec.atomic import atomic_output  # noqa: E402
from evspec.fingerprint import model_fingerprint, settings_digest  # noqa: E402
from evspec.speculative.cost import expected_tokens_per_cycle, predicted_decode_speedup  # noqa: E402
from evspec.speculative.names import INPUT_VARIANTS, OWN_DRAFTERS  # noqa: E402

TEMPLATES = Path(__file__).parent / "templates"
PAGES = ("index", "data", "stages", "alignment", "speculative", "clips")
CLIPS_SHOWN = 3  # best and worst clips per method on the per-clip page
SOFTWARE = ("torch", "transformers", "snakemake", "numpy", "pandas", "h5py")


def render_reports(results: Path, config: dict, model_dirs: dict[str, str], out_dir: Path) -> list[Path]:
    """Render every page into `out_dir` (atomically, as one directory)."""
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                                     keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)  # fmt: skip
    environment.filters["f"] = lambda value, digits=2: "n/a" if value is None else f"{value:.{digits}f}"
    environment.filters["pct"] = lambda value: "n/a" if value is None else f"{100 * value:.1f}%"
    with atomic_output(out_dir) as temporary:
        temporary.mkdir()
        context = {"results": str(results), "run": config.get("run", results.name)}
        context["data"] = data_section(results, temporary)
        context["stages"] = stages_section(results, temporary)
        context["alignment"] = alignment_section(results, temporary)
        context["spec"] = speculative_section(results, temporary)
        context["clips"] = clips_section(results, context["spec"], temporary)
        context["lossless_alpha"] = LOSSLESS_ALPHA
        # a projection to 7B shapes only: at the pair's own scale the run's prediction (its own c and v) is the one
        context["projection"] = projection(context["spec"], context["stages"]) if (
            context["spec"] and context["stages"] and context["stages"]["scale"] == "7b") else []  # fmt: skip
        context["toy"] = _json(results / "models" / "toy-metrics.json")
        context["run_info"] = run_info(config, model_dirs, context)
        for page in PAGES:
            text = environment.get_template(f"{page}.md.j2").render(**context)
            (temporary / f"{page}.md").write_text(text)
    return [out_dir / f"{page}.md" for page in PAGES]


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def data_section(results: Path, figures: Path) -> dict | None:
    manifest_path = results / "data" / "manifest.parquet"
    if not manifest_path.is_file():
        return None
    manifest = pd.read_parquet(manifest_path)
    skipped = pd.read_parquet(results / "data" / "skipped.parquet")
    window_ms = (manifest["event_end_us"] - manifest["event_start_us"]) / 1000
    figure, axis = plt.subplots(figsize=(6.5, 3.4))
    for split, rows in manifest.groupby("split"):
        axis.hist(rows["n_events"], bins=40, histtype="step", linewidth=1.5, label=f"{split} ({len(rows)} clips)")
    axis.set(xlabel="events in the draft's window", ylabel="clips",
             title=f"events per draft window ({', '.join(f'{w:g}' for w in sorted(set(window_ms.round(3))))} ms)")
    if window_ms.nunique() == 1:  # one window length: the same counts as a rate, on a second axis
        per_second = 1000 / float(window_ms.iloc[0]) / 1e3
        top = axis.secondary_xaxis("top", functions=(lambda n: n * per_second, lambda r: r / per_second))
        top.set_xlabel("event rate (thousand events / s)")
    axis.legend(fontsize=8, frameon=False)
    _save(figure, figures / "data_events.png")
    return {
        "n_clips": len(manifest), "n_skipped": len(skipped), "n_sequences": int(manifest["sequence"].nunique()),
        "splits": manifest.groupby("split").agg(clips=("sample_id", "size"), sequences=("sequence", "nunique"))
        .reset_index().to_dict("records"),
        "events_median": float(manifest["n_events"].median()), "events_p10": float(manifest["n_events"].quantile(0.1)),
        "events_p90": float(manifest["n_events"].quantile(0.9)), "window_ms": sorted(set(window_ms.round(3))),
        "clip_ms": sorted(set(((manifest["t_end_us"] - manifest["t_start_us"]) / 1000).round(3))),
        "question_types": manifest["question_type"].value_counts().to_dict(),
    }  # fmt: skip


def stages_section(results: Path, figures: Path) -> dict | None:
    path = results / "bench" / "stages.parquet"
    if not path.is_file():
        return None
    stages = pd.read_parquet(path)
    order = ["vision", "projector", "prefill", "decode_step"]
    per_model = stages[~stages["stage"].isin(["verify", "tree_verify", "draft_head_token", "draft_head_tree"])]
    table = per_model.pivot_table(index=["model", "images"], columns="stage", values="ms_median").reset_index()
    lengths = per_model.groupby(["model", "images"])["prefill_tokens"].first().reset_index()
    table = table.merge(lengths, on=["model", "images"])
    figure, (axis, decode_axis) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    labels = [f"{m}\n{i} image{'s' if i > 1 else ''}" for m, i in zip(table["model"], table["images"])]
    bottom = np.zeros(len(table))
    for stage in order:
        axis.bar(labels, table[stage], bottom=bottom, label=stage)
        bottom += table[stage].to_numpy()
    axis.set(ylabel="ms (median)", title=f"stage costs, {stages['scale'].iloc[0]} scale on {stages['device'].iloc[0]}")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)  # clear of the bars
    positions = np.arange(len(table))
    decode_axis.bar(positions, table["decode_step"], width=0.5, label="engine step")
    if "decode_floor" in table:
        decode_axis.hlines(table["decode_floor"], positions - 0.4, positions + 0.4, colors="crimson", linewidth=2.5,
                           label="memory floor")  # fmt: skip
    decode_axis.set(xticks=positions, xticklabels=labels, ylabel="ms per token", title="one decode step vs its floor")
    decode_axis.tick_params(axis="x", labelsize=7)
    decode_axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    _save(figure, figures / "stages.png")
    costs = _step_costs(stages)
    return {"rows": table.to_dict("records"), "costs": costs, "drafting": _drafting_costs(stages, costs),
            "scale": str(stages["scale"].iloc[0]), "device": str(stages["device"].iloc[0]),
            "dtype": str(stages["dtype"].iloc[0]), "repeats": int(stages["repeats"].iloc[0])}  # fmt: skip


def _drafting_costs(stages: pd.DataFrame, costs: dict) -> dict | None:
    """The head's size against the target's language model (and an EAGLE head's at 7B), and per k the
    cycle's unit costs over one target step: c (a head token) and v (a verify of k + 1 tokens)."""
    step = costs["target_step_ms"]
    head_rows = stages[stages["stage"] == "draft_head_token"]
    if step is None or head_rows.empty or "head_parameters" not in head_rows:
        return None
    sizes = head_rows.iloc[0]
    by_k = [{"k": k, "head_ms": costs["head_token_ms"].get(k), "verify_ms": verify_ms, "v": verify_ms / step,
             "c": costs["head_token_ms"][k] / step if k in costs["head_token_ms"] else None}
            for k, verify_ms in sorted(costs["verify_ms"].items())]  # fmt: skip
    trees = [{"drafts": n, "verify_ms": ms, "v": ms / step} for n, ms in sorted(costs["tree_verify_ms"].items())]
    head_tree = [{"depth": depth, "nodes": costs["head_tree_nodes"], "level_ms": ms, "c": ms / step}
                 for depth, ms in sorted(costs["head_tree_level_ms"].items())]  # fmt: skip
    return {"target_step_ms": step, "head_parameters": int(sizes["head_parameters"]), "trees": trees,
            "head_tree": head_tree,
            "target_language_parameters": int(sizes["target_language_parameters"]),
            "head_share": sizes["head_parameters"] / sizes["target_language_parameters"],
            "eagle_head_share_at_7b": float(sizes["eagle_head_share_at_7b"]), "by_k": by_k}  # fmt: skip


def alignment_section(results: Path, figures: Path) -> dict | None:
    metrics = _json(results / "adapter" / "metrics.json")
    if metrics is None:
        return None
    curves = results / "adapter" / "curves.png"
    if curves.is_file():
        (figures / "adapter_curves.png").write_bytes(curves.read_bytes())
    heads = {name: row for name, row in metrics["rows"].items() if "acceptance_at_position" in row}
    if heads:
        figure, axis = plt.subplots(figsize=(5, 3.2))
        for name, row in heads.items():
            positions = np.arange(1, len(row["acceptance_at_position"]) + 1)
            axis.plot(positions, [np.nan if v is None else v for v in row["acceptance_at_position"]], "o-", label=name)
        axis.set(xlabel="draft position", ylabel="offline acceptance (held-out answers)", ylim=(0, 1.02),
                 title="draft heads on held-out answers, drafting on their own predictions")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend(frameon=False)
        _save(figure, figures / "head_positions.png")
    return {**metrics, "event_gain": event_gain(metrics["rows"])}


def event_gain(rows: dict) -> dict | None:
    """What the events add to the draft head: its top-1 agreement with the target minus the text-only head's,
    on the same held-out tokens, with a 95% interval (two-proportion normal approximation; it ignores the
    pairing of the tokens, which only widens it)."""
    head, text_only = rows.get("head"), rows.get("head-text-only")
    if not head or not text_only or "top1_agreement" not in head or "top1_agreement" not in text_only:
        return None
    p, q, n = head["top1_agreement"], text_only["top1_agreement"], head["n_tokens"]
    half_width = 1.96 * ((p * (1 - p) + q * (1 - q)) / n) ** 0.5
    difference = p - q
    return {"head": p, "text_only": q, "n_tokens": n, "difference": difference,
            "ci95": (difference - half_width, difference + half_width),
            "reading": "the events help" if difference - half_width > 0 else
                       "the events hurt" if difference + half_width < 0 else "no difference is measurable"}  # fmt: skip


def _step_costs(stages: pd.DataFrame) -> dict:
    """Per-token costs a speculative cycle is made of: target step, verify(k), and each drafter's token."""
    def median(model: str, stage: str) -> float | None:
        """The stage's time at the model's largest image count (8 frames, 5 event images)."""
        rows = stages[(stages["model"] == model) & (stages["stage"] == stage)].sort_values("images")
        return float(rows["ms_median"].iloc[-1]) if len(rows) else None

    def per_k(stage: str) -> dict[int, float]:
        return {int(r.k): float(r.ms_median) for r in stages[stages["stage"] == stage].itertuples()}

    return {"target_step_ms": median("video_llava", "decode_step"), "eventgpt_step_ms": median("eventgpt", "decode_step"),
            "head_token_ms": per_k("draft_head_token"), "verify_ms": per_k("verify"),
            "tree_verify_ms": per_k("tree_verify"), "head_tree_level_ms": per_k("draft_head_tree"),
            "head_tree_nodes": _head_tree_nodes(stages)}  # fmt: skip


def _head_tree_nodes(stages: pd.DataFrame) -> int | None:
    """The node count of the head's tree that stage timing timed (its verify is the tree verify of that many)."""
    rows = stages[stages["stage"] == "draft_head_tree"]
    return int(rows["tree_nodes"].iloc[0]) if len(rows) and "tree_nodes" in rows else None


def projection(summary: dict, stages: dict) -> list[dict]:
    """Decode-phase speedup projected from stage costs (bench/stages.parquet) and this run's acceptance.

    The cost model of `evspec.speculative.cost` with the measured conditional acceptance per draft
    position, c = draft token / target step and v = verify(k + 1 tokens) / target step from
    the stage timings: E / (k c + v). For `feature-tree` (k = the depth): c = one level of the head's tree and
    v = the verify of [last] + the tree's nodes, both timed at the tree shape the run drafts.
    """
    costs = stages["costs"]
    step = costs["target_step_ms"]
    rows = []
    for entry in summary["methods"]:
        k, method = entry["k"], entry["method"]
        if method == "feature-tree":
            ms = costs["head_tree_level_ms"].get(k)
            verify_ms = costs["tree_verify_ms"].get(costs["head_tree_nodes"])
        else:
            ms = costs["head_token_ms"].get(k) if method == "feature" else (
                costs["eventgpt_step_ms"] if method in ("token", "prefill") else None)  # fmt: skip
            verify_ms = costs["verify_ms"].get(k)
        rates = entry.get("conditional_acceptance_by_position")
        if rates is None or ms is None or step is None or verify_ms is None:
            continue
        c, v = ms / step, verify_ms / step
        rows.append({"method": entry["method"], "k": k, "conditional": rates, "c": c, "verify_over_step": v,
                     "tokens_per_cycle": expected_tokens_per_cycle(rates),
                     "projected_speedup": predicted_decode_speedup(rates, c, v)})  # fmt: skip
    return rows


def speculative_section(results: Path, figures: Path) -> dict | None:
    summary = _json(results / "spec" / "summary.json")
    if summary is None:
        return None
    drafting = [m for m in summary["methods"] if m.get("conditional_acceptance_by_position")]
    if drafting:
        figure, axis = plt.subplots(figsize=(6, 3.5))
        for entry in drafting:
            values = [np.nan if v is None else v for v in entry["conditional_acceptance_by_position"]]
            axis.plot(np.arange(1, len(values) + 1), values, "o-", label=f"{entry['method']} k={entry['k']}")
        axis.set(xlabel="draft position (tree depth for trees)", ylabel="acceptance given the prefix", ylim=(0, 1.02),
                 title="conditional acceptance per draft position")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        _save(figure, figures / "spec_positions.png")
    _speedup_by_k_figure(summary, figures / "speedup_vs_k.png")
    for entry in summary["methods"]:
        entry["lossless"] = _lossless_evidence(entry, summary["greedy"], summary.setdefault("dtype", "float32"))
    ok = [m for m in summary["methods"] if m["status"] == "ok" and m["method"] != "target"]
    selected = summary.get("selection", {}).get("k", {})  # each method's k, chosen on another split
    best = {}
    for entry in ok:
        method = entry["method"]
        if not entry["lossless"]["consistent"] or (method in selected and entry["k"] != selected[method]):
            continue
        if method not in best or entry["speedup_median"] > best[method]["speedup_median"]:
            best[method] = entry
    ks = {}
    for entry in ok:
        ks.setdefault(entry["method"], set()).add(entry["k"])
    chosen_here = sorted(m for m in best if len(ks[m]) > 1 and m not in selected)  # k fitted to these clips
    ranked = sorted(best.values(), key=lambda e: -e["speedup_median"])
    own = [e for e in ranked if e["method"] in OWN_DRAFTERS]
    return {**summary, "best": own, "verdict": _verdict(own[0]) if own else None, "k_chosen_here": chosen_here,
            "peers": [m for m in summary["methods"] if m["method"] not in (*OWN_DRAFTERS, *INPUT_VARIANTS, "target")],
            "input_variants": [m for m in summary["methods"] if m["method"] in INPUT_VARIANTS],
            "answer_tokens_by_type": _answer_tokens_by_type(summary),
            "not_lossless": [m for m in ok if not m["lossless"]["consistent"] and m["method"] in OWN_DRAFTERS],
            "not_run": [m for m in summary["methods"] if m["status"] != "ok" and m["method"] in OWN_DRAFTERS]}  # fmt: skip


def clips_section(results: Path, spec: dict | None, figures: Path) -> dict | None:
    """Per clip, for each speculative method at its best k: the speedup's distribution (a figure) and the
    clips where it gained most and least, with the question, the answer and its tokens per target forward."""
    path = results / "spec" / "clips.parquet"
    if spec is None or not spec["best"] or not path.is_file():
        return None
    clips = pd.read_parquet(path)
    chosen = [(e["method"], e["k"]) for e in spec["best"]]
    per_method = {f"{m} k={k}": clips[(clips["method"] == m) & (clips["k"] == k)].sort_values("speedup") for m, k in chosen}
    figure, axis = plt.subplots(figsize=(7, 0.5 + 0.45 * len(per_method)))
    axis.boxplot([rows["speedup"].to_numpy() for rows in per_method.values()], vert=False, whis=(5, 95))
    axis.set_yticks(range(1, len(per_method) + 1), list(per_method))
    axis.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    axis.set(xlabel="speedup over the target alone, per clip (x)", title="per-clip speedup, each method at its best k")
    _save(figure, figures / "clip_speedups.png")
    columns = ["sample_id", "question_type", "question", "answer_text", "new_tokens", "tokens_per_forward", "speedup"]
    return {"path": str(path), "methods": {name: {"n": len(rows), "worst": rows.head(CLIPS_SHOWN)[columns].to_dict("records"),
                                                  "best": rows.tail(CLIPS_SHOWN)[::-1][columns].to_dict("records")}
                                           for name, rows in per_method.items()}}  # fmt: skip


def _speedup_by_k_figure(summary: dict, path: Path) -> None:
    """Each speculative method's end-to-end speedup against k: medians with their 95% intervals."""
    rows = [m for m in summary["methods"] if m["status"] == "ok" and m["method"] in OWN_DRAFTERS]
    if not rows:
        return
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    for offset, method in enumerate(sorted({m["method"] for m in rows})):
        entries = sorted((m for m in rows if m["method"] == method), key=lambda m: m["k"])
        ks = np.array([m["k"] for m in entries]) + 0.06 * (offset - 2)  # side by side at a shared k
        medians = np.array([m["speedup_median"] for m in entries])
        low, high = (np.array([m["speedup_ci95"][i] for m in entries]) for i in (0, 1))
        axis.errorbar(ks, medians, yerr=[medians - low, high - medians], fmt="o-", capsize=3, label=method)
    axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="the target alone")
    axis.set(xlabel="k (draft length; tree depth for trees)", ylabel="speedup over the target alone (x)",
             title="end-to-end speedup vs k (median, 95% interval)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    _save(figure, path)


def _verdict(best: dict) -> str:
    """Whether the best speculative method is faster than the target alone, by its interval of the median."""
    low, high = best["speedup_ci95"]
    if low > 1:
        return "faster than"
    return "slower than" if high < 1 else "not distinguishable from"


def _answer_tokens_by_type(summary: dict) -> dict[str, dict]:
    """The target's median answer length and clip count per question type (from the target's own row)."""
    target = next((m for m in summary["methods"] if m["method"] == "target" and m["status"] == "ok"), None)
    if target is None:
        return {}
    return {kind: {"clips": row["n_clips"], "median": row.get("target_answer_tokens_median")}
            for kind, row in sorted(target.get("by_question_type", {}).items())}  # fmt: skip


LOSSLESS_ALPHA = 0.001  # a sampling method whose distribution test gives p below this is reported as not lossless


def _lossless_evidence(entry: dict, greedy: bool, dtype: str = "float32") -> dict:
    """What shows a method lossless: exact ids (greedy) or the distribution test (sampling).

    In reduced precision (bf16, fp16) a verify of k + 1 tokens rounds differently from k + 1 single steps, so
    greedy ids may part where two logits tie within the rounding: there the identical share and the first
    divergences are reported (REFERENCE.md), the method is shown beside its rate, and losslessness is what
    the float32 runs and tests establish."""
    if entry["status"] != "ok" or entry["method"] == "target":
        return {"consistent": entry["status"] == "ok", "text": "reference" if entry["method"] == "target" else "-"}
    if entry["method"] in INPUT_VARIANTS:  # another input: its answers may differ, by design
        rate = entry.get("exact_match_rate")
        return {"consistent": True, "text": "another input: " + (f"{100 * rate:.1f}% of clips agree" if rate is not None
                                                                 else "agreement not measured when sampling")}  # fmt: skip
    if greedy:
        rate = entry["exact_match_rate"]
        if dtype != "float32":
            return {"consistent": True, "text": f"{100 * rate:.1f}% of clips identical in {dtype} "
                                                f"(lossless is exact in float32)"}  # fmt: skip
        return {"consistent": rate == 1.0, "text": f"{100 * rate:.1f}% of clips identical"}
    test = entry.get("lossless_test")
    if test is None:
        return {"consistent": False, "text": "no distribution test (no draws, or too few distinct tokens)"}
    return {"consistent": test["p_value"] >= LOSSLESS_ALPHA,
            "text": f"p = {test['p_value']:.3g} ({test['draws_per_clip']} draws x {test['clips']} clips, "
                    f"{test['tests']} tests)"}  # fmt: skip


def run_info(config: dict, model_dirs: dict[str, str], context: dict) -> dict:
    fingerprints = {}
    for role, directory in model_dirs.items():
        path = Path(directory)
        fingerprints[role] = model_fingerprint(path) if (path / "config.json").is_file() else "not found"
    versions = {}
    for package in SOFTWARE:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    spec = context["spec"]
    return {"config_digest": settings_digest(config), "fingerprints": fingerprints, "versions": versions,
            "python": platform.python_version(), "report_machine": f"{platform.machine()} {platform.processor()}".strip(),
            "spec_device": spec["device"] if spec else None,
            "stages_device": context["stages"]["device"] if context["stages"] else None}  # fmt: skip


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)
