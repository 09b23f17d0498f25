# Shared helpers for the rules: paths of this run, the datasets and models it reads, and the code
# fingerprints that make Snakemake rerun a rule when the code it runs changes. Functions live here and
# rules in the stage files (Snakemake's lint). Every rule runs `python -m evspec <command>`.
import json
import os
import sys

# Hash of the evspec source a rule's command runs (its imports, closed): a param, so editing a module
# reruns exactly the rules whose commands import it (Snakemake tracks a rule's own code, not its imports).
from evspec.fingerprint import command_code

ENV = "../envs/evspec.yaml"  # every rule's conda env (relative to the rule files)
RESULTS = f"results/{config['run']}"
REPORTS = f"reports/{config['run']}"
LOGS = f"{RESULTS}/logs"
# The interpreter running Snakemake has evspec installed (make demo sets that up): its directory comes first
# on the PATH of every job, so a job's `python` is that interpreter (a rule's conda env, when used, is
# activated in front of it).
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def as_json(value):
    """A config section as one canonical JSON argument (and a rerun trigger through params)."""
    return json.dumps(value, sort_keys=True)


# Data: the synthetic world, or recordings in the DSEC layout.
DATASET = config["dataset"]
SYNTHETIC = DATASET["kind"] == "synthetic"


def dataset_root():
    return f"{RESULTS}/world" if SYNTHETIC else DATASET["root"]


def dataset_inputs():
    """The synthetic world, or every DSEC file the clips are cut from, frames included (so a replaced file
    reruns the stage)."""
    if SYNTHETIC:
        return [f"{RESULTS}/world"]
    root = Path(DATASET["root"])
    files = []
    for name in DATASET["sequences"]:
        files += [root / name / "events/left/events.h5", root / name / "images/timestamps.txt"]
        files += sorted((root / name / "images/left/rectified").glob("*.png"))
    return files


# Models: the toy pair the pipeline trains itself (demo), or local checkpoints (real runs).
MODELS = config["models"]
TOY = MODELS["source"] == "toy"
TOY_DIR = f"{RESULTS}/models/toy"
# How every model-running stage loads and runs the pair (passed inside each stage's settings).
MODEL_RUNTIME = {key: MODELS[key] for key in ("device", "dtype", "compile", "draft_pixel_dtype", "draft_vision_tower")}


def model_paths():
    """Checkpoint and tokenizer directories of both models, wherever they come from."""
    if TOY:
        return {part: f"{TOY_DIR}/{part}" for part in ("draft", "target", "draft_tokenizer", "target_tokenizer")}
    return {
        "draft": MODELS["draft"],
        "target": MODELS["target"],
        "draft_tokenizer": MODELS["draft_tokenizer"] or MODELS["draft"],
        "target_tokenizer": MODELS["target_tokenizer"] or MODELS["target"],
    }


def model_inputs():
    """What the model-reading rules depend on: the toy pair's directory, or the checkpoints."""
    if TOY:
        return [TOY_DIR]
    return sorted(set(model_paths().values()) | ({MODELS["draft_vision_tower"]} if MODELS["draft_vision_tower"] else set()))


# Speculative evaluation: the evaluated split, and the split each method's k is chosen on.
SPEC = f"{RESULTS}/spec"
SPEC_CONFIG = config["speculative"]
SPEC_SHARDS = range(SPEC_CONFIG["shards"])
# each method's k is chosen on another split: the methods with several k run there too, with the target
SELECTION = f"{SPEC}/selection"
SELECTION_METHODS = ["target"] + [m for m in SPEC_CONFIG["methods"] if len(SPEC_CONFIG["draft_lengths"].get(m, [])) > 1]
SELECTING = bool(SPEC_CONFIG["selection_split"]) and len(SELECTION_METHODS) > 1
wildcard_constraints:
    shard=r"\d+",
    window_ms=r"\d+",
    tree_top_k=r"\d+",
    tree_nodes=r"\d+",
    rtt_ms=r"\d+",


# the event-window sweep: these methods, with the target, on each other length of the draft's window
WINDOW_SWEEP = config["windows"]["event_window_sweep_ms"]
WINDOW_METHODS = ["target"] + [m for m in SPEC_CONFIG["window_sweep_methods"] if m in SPEC_CONFIG["methods"]]
# the tree-shape sweep: the tree methods, with the target, at each other (top-k, nodes); k stays their depths
TREE_SWEEP = [tuple(shape) for shape in SPEC_CONFIG["tree_sweep"]]
TREE_METHODS = ["target"] + [m for m in ("token-tree", "feature-tree") if m in SPEC_CONFIG["methods"]]
# edge-cloud drafting: these methods, with the target, over a link of each round trip
EDGE = SPEC_CONFIG["edge_cloud"]
LINK_SWEEP = EDGE["rtt_ms"]
LINK_METHODS = ["target"] + [m for m in EDGE["methods"] if m in SPEC_CONFIG["methods"]]


def speculate_settings(split: str, methods: list[str], **overrides) -> str:
    """The speculate command's settings: the config's, on `split` with `methods`, and the models' runtime."""
    settings = {key: value for key, value in SPEC_CONFIG.items()
                if key not in ("shards", "selection_split", "window_sweep_methods", "tree_sweep", "edge_cloud")}
    return as_json(settings | {"split": split, "methods": methods} | overrides | MODEL_RUNTIME)


def parent(name: str, levels: int = 1):
    """A param holding the directory `levels` up from the named input or output file (derived, not hard-coded)."""

    def directory(wildcards, input, output):
        files = {**dict(input.items()), **dict(output.items())}[name]
        return str(Path(files if isinstance(files, str) else files[0]).parents[levels - 1])

    return directory
