"""The Snakemake DAG: config validation, a real run of the data stage, and what a change reruns."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from conftest import PROJECT

TINY_CONFIG = {
    "run": "tiny",
    "world": {"n_sequences": 5, "duration_s": 1.0, "height": 48, "width": 64, "radius_px": [4, 8], "speed_px_s": [8, 20]},
    "windows": {"min_events": 20, "event_window_sweep_ms": [25]},
    "split": {"fractions": {"train": 0.6, "test": 0.4}},
    "toy": {"steps": 3, "batch_size": 4, "shape": {"draft_image_size": 32, "target_image_size": 24, "vision_hidden_size": 32,
                                                   "hidden_size": 32}},
    "features": {"max_new_tokens": 4},
    "bench": {"repeats": 3, "warmup": 1},
    "adapter": {"adapter_steps": 5, "head_steps": 5, "unroll_steps": 1, "adapter_hidden_size": 16,
                "head_intermediate_size": 32},
    "speculative": {"max_new_tokens": 4, "max_clips": 2, "shards": 2, "selection_split": None,
                    "draft_lengths": {"hf-assisted": [2], "token": [2], "feature": [2], "prefill": [2]},
                    "edge_cloud": {"rtt_ms": [5], "max_clips": 2}},
}
NO_LINK = {**TINY_CONFIG["speculative"], "edge_cloud": {"rtt_ms": []}}  # for the runs that test other things
# the event-window sweep and the edge-cloud links run speculate on other windows and over links
SPECULATE_RULES = {"speculate", "speculate_window", "speculate_link"}
DOWNSTREAM_OF_DATA = {"train_toy", "extract_target_features", "extract_draft_features", "train_adapter",
                      "spec_summary", "bench_stages", "report"} | SPECULATE_RULES


def snakemake(workdir, *args, config=None, check=True, env=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(PROJECT / "Snakefile"),
               "--directory", str(workdir), "--cores", "2"]  # fmt: skip
    if config is not None:
        path = workdir / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        command += ["--configfile", str(path)]
    result = subprocess.run(command + list(args), capture_output=True, text=True, timeout=1200, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{result.stdout}\n{result.stderr}")
    return result


TIMING_KEYS = {"train_seconds", "eval_seconds"}


def deterministic_digests(results) -> dict[str, str]:
    """Content hashes of everything a run produces except timings: data, models, metrics, decoded ids."""
    import h5py
    import hdf5plugin  # noqa: F401  (the LZ4 filter of tensors.h5)

    def digest(value) -> str:
        return hashlib.sha256(value if isinstance(value, bytes) else json.dumps(value, sort_keys=True).encode()).hexdigest()

    def without_timings(value):
        if isinstance(value, dict):
            return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
        return value

    out = {"manifest": digest(pd.read_parquet(results / "data/manifest.parquet").to_csv().encode())}
    with h5py.File(results / "data/tensors.h5") as handle:
        out.update({name: digest(handle[name][:].tobytes()) for name in ("event_images", "frames", "frame_single")})
    for name in ("models/toy/target/model.safetensors", "models/toy/draft/model.safetensors",
                 "adapter/head.safetensors", "adapter/adapter.safetensors"):  # fmt: skip
        out[name] = digest((results / name).read_bytes())
    for name in ("models/toy-metrics.json", "adapter/metrics.json"):
        out[name] = digest(without_timings(json.loads((results / name).read_text())))
    spec = pd.concat([pd.read_parquet(p) for p in sorted((results / "spec").glob("*/shard-*.parquet"))])
    ids = spec.sort_values(["method", "k", "sample_id"])[["method", "k", "sample_id", "output_ids", "accepted"]]
    out["spec_ids"] = digest(ids.astype(str).to_csv().encode())
    return out


def _comment(text: str) -> str:
    return text + "\n# an edit\n"


def _edit_cli_block(text: str) -> str:  # one command's arguments in the CLI module
    return text.replace('help="summary.json to write")', 'help="summary.json to write (edited)")')


SUMMARY_AND_REPORT = {"spec_summary", "report"}
RERUN_BY_EDIT = [  # (file under src/evspec, the edit, the rules a dry run must then plan)
    ("report/templates/stages.md.j2", lambda text: text + "{# an edit #}\n", {"report"}),
    ("report/render.py", _comment, {"report"}),
    ("speculative/summary.py", _comment, SUMMARY_AND_REPORT),
    ("__main__.py", _edit_cli_block, SUMMARY_AND_REPORT),
    ("speculative/drafters.py", _comment, SPECULATE_RULES | SUMMARY_AND_REPORT),
    ("timing.py", _comment, {"bench_stages"} | SPECULATE_RULES | SUMMARY_AND_REPORT),
    ("engine/head.py", _comment, {"train_adapter", "bench_stages"} | SPECULATE_RULES | SUMMARY_AND_REPORT),
    ("world/esim.py", _comment, {"synthesize_world", "build_tensors"} | DOWNSTREAM_OF_DATA),
]


def planned_rules(workdir, config) -> set[str]:
    """Rules a dry run would execute (besides `all`)."""
    output = snakemake(workdir, "--dry-run", config=config).stdout
    return set(re.findall(r"^(?:local)?rule (\w+):", output, flags=re.MULTILINE)) - {"all"}


@pytest.mark.parametrize("config_file", ["config.yaml", "dsec.yaml"])
def test_shipped_configs_validate_and_plan(tmp_path, config_file):
    result = snakemake(tmp_path, "--dry-run", "--configfile", str(PROJECT / "config" / config_file), check=False)
    if config_file == "config.yaml":
        assert result.returncode == 0, result.stderr
        assert "synthesize_world" in result.stdout and "build_tensors" in result.stdout
        assert "rule speculate_selection:" in result.stdout  # each method's k is chosen on the val split
        assert "rule speculate_window:" in result.stdout and "rule speculate_tree:" in result.stdout  # the sweeps
        assert "rule speculate_link:" in result.stdout
    else:  # valid config; fails only because the example's DSEC files are not on this machine
        output = result.stdout + result.stderr
        assert "MissingInputException" in output and "zurich_city_00_a/events/left/events.h5" in output


@pytest.mark.parametrize(
    "change, message",
    [
        ({"windows": {"event_window_ms": 150}}, r"150 is greater than the maximum of 99[\s\S]*event_window_ms"),
        ({"dataset": {"kind": "dsec"}}, r"'' should be non-empty[\s\S]*\['dataset'\]\['root'\]"),
        ({"world": {"n_sequence": 3}}, r"Additional properties are not allowed \('n_sequence' was unexpected\)"),
        # rules across keys (evspec.config_checks)
        ({"windows": {"clip_overlap_ms": 500}}, r"windows.clip_overlap_ms \(500\) must be below windows.clip_duration_ms \(500\)"),
        ({"windows": {"clip_duration_ms": 40, "clip_overlap_ms": 0, "event_window_ms": 60}},
         r"windows.event_window_ms \(60\) must fit in windows.clip_duration_ms \(40\)"),
        ({"world": {**TINY_CONFIG["world"], "duration_s": 0.2}}, r"world.duration_s \(0.2\) is shorter than one clip"),
        ({"split": {"fractions": {"train": 0, "test": 0}}}, r"split.fractions gives no sequences to train and test"),
        ({"windows": {"event_window_sweep_ms": [25, 50]}},
         r"windows.event_window_sweep_ms \(\[25, 50\]\) must hold lengths other than windows.event_window_ms \(50\)"),
        ({"windows": {"event_window_sweep_ms": [25]}, "speculative": {**TINY_CONFIG["speculative"], "window_sweep_methods": ["cascade"]}},
         r"sweeps none of speculative.methods"),
        ({"speculative": {**TINY_CONFIG["speculative"], "edge_cloud": {"rtt_ms": [5], "methods": ["feature"]},
                          "methods": ["target", "token"]}},
         r"speculative.edge_cloud.rtt_ms \(\[5\]\) runs none of speculative.methods"),
        ({"speculative": {**TINY_CONFIG["speculative"], "tree_sweep": [[4, 16]]}},
         r"speculative.tree_sweep \(\[\[4, 16\]\]\) must hold shapes other than \[tree_top_k, tree_nodes\] \(\[4, 16\]\)"),
        ({"speculative": {**TINY_CONFIG["speculative"], "selection_split": "val"}},
         r"speculative.selection_split \('val'\) has no sequences in split.fractions"),
    ],
)
def test_invalid_config_fails_before_any_job_with_key_and_reason(tmp_path, change, message):
    result = snakemake(tmp_path, "--dry-run", config={**TINY_CONFIG, **change}, check=False)
    assert result.returncode != 0
    assert re.search(message, result.stdout + result.stderr), result.stderr
    assert not (tmp_path / "results").exists()


def test_config_check_names_every_broken_rule_across_keys():
    """All broken rules in one message (a user fixes them in one go), a drafting method without draft lengths
    among them; the shipped configs pass."""
    from snakemake.utils import update_config, validate

    from evspec.config_checks import check_config
    from evspec.errors import InputError

    schema = str(PROJECT / "workflow" / "schemas" / "config.schema.yaml")
    for name in ("config.yaml", "sampling.yaml", "dsec.yaml"):
        config = yaml.safe_load((PROJECT / "config" / "config.yaml").read_text())
        update_config(config, yaml.safe_load((PROJECT / "config" / name).read_text()))  # as --configfile merges
        validate(config, schema)  # fills the schema's defaults, as the Snakefile's validate does
        check_config(config)
    config["windows"]["clip_overlap_ms"] = config["windows"]["clip_duration_ms"]
    config["speculative"]["draft_lengths"].pop("feature-tree")
    with pytest.raises(InputError, match=r"clip_overlap_ms .* must be below[\s\S]*draft_lengths needs a list of k for \['feature-tree'\]"):
        check_config(config)


@pytest.mark.slow
def test_data_stage_runs_and_reruns_exactly_what_a_change_invalidates(tiny_run):
    tmp_path = tiny_run
    manifest = pd.read_parquet(tmp_path / "results/tiny/data/manifest.parquet")
    assert len(manifest) == 15 and (tmp_path / "results/tiny/logs/build_tensors.log").is_file()
    summary = json.loads((tmp_path / "results/tiny/spec/summary.json").read_text())
    assert {m["method"] for m in summary["methods"]} == {"target", "hf-generate", "hf-assisted", "token", "feature",
                                                        "prefill"}  # fmt: skip
    assert all(m.get("exact_match_rate", 1.0) == 1.0 for m in summary["methods"] if m["status"] == "ok")
    assert "The best speculative method" in (tmp_path / "reports/tiny/index.md").read_text()
    sweep = {(e["method"], e["window_ms"]) for e in summary["event_window_sweep"]}  # the swept and the own window
    assert sweep == {("token", 25), ("token", 50), ("feature", 25), ("feature", 50)}
    assert "| token | 2 | 25 |" in (tmp_path / "reports/tiny/index.md").read_text()
    links = {(e["method"], e["rtt_ms"]) for e in summary["link_sweep"]}  # over the link and on one machine
    assert links == {("token", 5), ("token", 0), ("feature", 5), ("feature", 0)}
    assert "break-even round trip" in (tmp_path / "reports/tiny/index.md").read_text()
    stages = pd.read_parquet(tmp_path / "results/tiny/bench/stages.parquet")
    adapter = json.loads((tmp_path / "results/tiny/adapter/metrics.json").read_text())
    timed_head = stages.loc[stages["stage"] == "draft_head_token", "head_parameters"].iloc[0]
    assert timed_head == adapter["rows"]["head"]["parameters"]  # the head timed is the head trained and served
    snakemake(tmp_path, "--report", "reports/tiny.html", config=TINY_CONFIG)  # Snakemake's own HTML report
    assert "stages.png" in (tmp_path / "reports/tiny.html").read_text()
    assert planned_rules(tmp_path, TINY_CONFIG) == set()
    started = time.monotonic()
    assert "Nothing to be done" in snakemake(tmp_path, config=TINY_CONFIG).stderr
    assert time.monotonic() - started <= 5.0  # a no-op rerun is cheap (the bound)
    windows_changed = {**TINY_CONFIG, "windows": {**TINY_CONFIG["windows"], "n_event_images": 3}}
    assert planned_rules(tmp_path, windows_changed) == {"build_tensors"} | DOWNSTREAM_OF_DATA
    world_changed = {**TINY_CONFIG, "world": {**TINY_CONFIG["world"], "pos_thres": 0.25}}
    assert planned_rules(tmp_path, world_changed) == {"synthesize_world", "build_tensors"} | DOWNSTREAM_OF_DATA
    adapter_changed = {**TINY_CONFIG, "adapter": {**TINY_CONFIG["adapter"], "head_steps": 6}}
    # stage timing times the trained head at the pair's scale, so it follows the adapter stage too
    assert planned_rules(tmp_path, adapter_changed) == {"train_adapter", "spec_summary", "bench_stages",
                                                        "report"} | SPECULATE_RULES  # fmt: skip
    # an edit to one file reruns the rules whose commands import it (by hand from the import graph), and
    # what consumes their products
    for file, edit, rerun in RERUN_BY_EDIT:
        path = PROJECT / "src" / "evspec" / file
        original = path.read_text()
        try:
            path.write_text(edit(original))
            assert planned_rules(tmp_path, TINY_CONFIG) == rerun, file
        finally:
            path.write_text(original)
    # recorded data in the DSEC layout: every file the clips are cut from is an input, frames included
    world = tmp_path / "results/tiny/world"
    sequences = sorted(p.name for p in world.iterdir() if (p / "events").is_dir())
    dsec = {**TINY_CONFIG, "run": "dsec", "dataset": {"kind": "dsec", "root": str(world), "sequences": sequences}}
    plan = snakemake(tmp_path, "--dry-run", "build_tensors", config=dsec).stdout
    frames = sorted((world / sequences[0] / "images/left/rectified").glob("*.png"))
    assert frames and all(str(frame) in plan for frame in frames)


@pytest.mark.slow
def test_the_whole_dag_samples_on_checkpoints_in_the_real_layouts(tmp_path):
    """models.source checkpoints: EventGPT with tokenizer.model only and its tower in mm_visual_tower,
    Video-LLaVA-7B-hf's sharded legacy keys; sampling with top-p, the distribution test in the report."""
    from real_layout import write_real_pair

    paths = write_real_pair(tmp_path / "checkpoints", tower_inside=False)
    config = {**TINY_CONFIG, "models": {"source": "checkpoints", "draft": str(paths["draft"]), "target": str(paths["target"])},
              "speculative": {**NO_LINK, "temperature": 0.8, "top_p": 0.9, "lossless_clips": 1,
                              "lossless_draws": 40, "lossless_tokens": 2}}  # fmt: skip
    snakemake(tmp_path, config=config)
    summary = json.loads((tmp_path / "results/tiny/spec/summary.json").read_text())
    entries = {(m["method"], m["k"]): m for m in summary["methods"]}
    assert not summary["greedy"] and summary["top_p"] == 0.9
    assert all(m["status"] == "ok" for m in entries.values() if m["method"] != "hf-assisted")
    assert "exact_match_rate" not in entries[("token", 2)]  # one sample per method proves nothing
    assert entries[("token", 2)]["lossless_test"]["draws_per_clip"] == 40
    speculative = (tmp_path / "reports/tiny/speculative.md").read_text()
    assert "Pearson's chi-square test of homogeneity" in speculative and "Negative control" in speculative


@pytest.mark.slow
def test_two_runs_from_clean_give_identical_results(tiny_run, tmp_path):
    snakemake(tmp_path, config=TINY_CONFIG)
    assert deterministic_digests(tiny_run / "results/tiny") == deterministic_digests(tmp_path / "results/tiny")


def test_the_dependency_ranges_agree_in_pyproject_environment_and_the_rules_env():
    """One set of ranges: pyproject.toml (pip), environment.yml (a user's conda env) and the rules' conda env."""
    import tomllib

    conda_names = {"pytorch": "torch", "matplotlib-base": "matplotlib", "snakemake-minimal": "snakemake"}

    def conda(path) -> dict[str, str]:
        entries = [e for e in yaml.safe_load(path.read_text())["dependencies"] if isinstance(e, str) and e != "pip"]
        pairs = [re.match(r"([\w.-]+)(.*)", entry).groups() for entry in entries]
        return {conda_names.get(name, name): spec for name, spec in pairs}

    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    pip = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    pip_ranges = {name: spec for name, spec in (re.match(r"([\w.-]+)([^;#]*)", d).groups() for d in pip)}
    user_env, rules_env = conda(PROJECT / "environment.yml"), conda(PROJECT / "workflow" / "envs" / "evspec.yaml")
    assert {name: pip_ranges[name] for name in user_env if name != "python"} == \
        {name: spec for name, spec in user_env.items() if name != "python"}  # fmt: skip
    assert rules_env.items() <= user_env.items()
    assert set(user_env) - set(rules_env) == {"snakemake", "snakemake-executor-plugin-slurm", "pytest", "pytest-timeout",
                                              "hypothesis"}  # fmt: skip
