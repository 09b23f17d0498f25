"""Rules across config keys, checked by the Snakefile before any job runs.

The schema (workflow/schemas/config.schema.yaml) checks each key alone; these rules relate keys,
and without them a bad combination fails only inside a job, after the jobs before it ran.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evspec.errors import InputError
from evspec.speculative.names import DRAFTING


def check_config(config: Mapping[str, Any]) -> None:
    """Every cross-key rule; one `InputError` naming each broken rule's keys (the schema's defaults filled in)."""
    problems = []
    windows = config["windows"]
    duration, overlap, event_window = windows["clip_duration_ms"], windows["clip_overlap_ms"], windows["event_window_ms"]
    if overlap >= duration:
        problems.append(f"windows.clip_overlap_ms ({overlap}) must be below windows.clip_duration_ms ({duration}), "
                        f"or consecutive clips would not advance")  # fmt: skip
    if event_window > duration:
        problems.append(f"windows.event_window_ms ({event_window}) must fit in windows.clip_duration_ms ({duration}): "
                        f"the events are the clip's last milliseconds")  # fmt: skip
    sweep = windows.get("event_window_sweep_ms", [])
    if any(ms > duration for ms in sweep) or event_window in sweep or len(set(sweep)) < len(sweep):
        problems.append(f"windows.event_window_sweep_ms ({sweep}) must hold lengths other than windows.event_window_ms "
                        f"({event_window}), each once, each within windows.clip_duration_ms ({duration})")  # fmt: skip
    speculative = config["speculative"]
    swept_methods = [m for m in speculative.get("window_sweep_methods", []) if m in speculative["methods"]]
    if sweep and not swept_methods:
        problems.append(f"windows.event_window_sweep_ms ({sweep}) sweeps none of speculative.methods: "
                        f"speculative.window_sweep_methods must name one of them")  # fmt: skip
    edge = speculative.get("edge_cloud", {})
    if edge.get("rtt_ms") and not set(edge.get("methods", ["token", "feature"])) & set(speculative["methods"]):
        problems.append(f"speculative.edge_cloud.rtt_ms ({edge['rtt_ms']}) runs none of speculative.methods: "
                        f"speculative.edge_cloud.methods must name one of them")  # fmt: skip
    if len(set(edge.get("rtt_ms", []))) < len(edge.get("rtt_ms", [])):
        problems.append(f"speculative.edge_cloud.rtt_ms ({edge['rtt_ms']}) must hold each round trip once")
    shapes = [tuple(shape) for shape in speculative.get("tree_sweep", [])]
    own_shape = (speculative["tree_top_k"], speculative["tree_nodes"])
    if own_shape in shapes or len(set(shapes)) < len(shapes):
        problems.append(f"speculative.tree_sweep ({[list(s) for s in shapes]}) must hold shapes other than "
                        f"[tree_top_k, tree_nodes] ({list(own_shape)}), each once")  # fmt: skip
    if shapes and not {"token-tree", "feature-tree"} & set(speculative["methods"]):
        problems.append("speculative.tree_sweep sweeps tree shapes but speculative.methods has no token-tree or "
                        "feature-tree")  # fmt: skip
    if config["dataset"]["kind"] == "synthetic" and config["world"]["duration_s"] * 1000 < duration:
        problems.append(f"world.duration_s ({config['world']['duration_s']}) is shorter than one clip "
                        f"(windows.clip_duration_ms = {duration}): no recording would hold a clip")  # fmt: skip
    fractions = config["split"]["fractions"]
    empty = [name for name in ("train", "test") if fractions.get(name, 0) <= 0]
    if empty:
        problems.append(f"split.fractions gives no sequences to {' and '.join(empty)} ({dict(fractions)})")
    lengths = speculative.get("draft_lengths", {})
    missing = [method for method in speculative["methods"] if method in DRAFTING and not lengths.get(method)]
    if missing:
        problems.append(f"speculative.draft_lengths needs a list of k for {missing} (speculative.methods runs them)")
    selection = speculative.get("selection_split")
    if selection and fractions.get(selection, 0) <= 0:
        problems.append(f"speculative.selection_split ({selection!r}) has no sequences in split.fractions "
                        f"({dict(fractions)}): give it a fraction, or set selection_split to null")  # fmt: skip
    if problems:
        raise InputError("config", "; ".join(problems))
