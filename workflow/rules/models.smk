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


rule train_toy:
    input:
        manifest=rules.build_tensors.output.manifest,
        tensors=rules.build_tensors.output.tensors,
    output:
        models=directory(TOY_DIR),
        metrics=f"{RESULTS}/models/toy-metrics.json",
    params:
        settings=as_json({**config["toy"], "device": MODELS["device"]}),
        data_dir=f"{RESULTS}/data",
        code=command_code("train-toy"),
    threads: config["toy"]["threads"]
    resources:
        gpu=1 if MODELS["device"] == "cuda" else 0,
    log:
        f"{LOGS}/train_toy.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_toy.tsv"
    shell:
        "{EVSPEC} train-toy --data-dir {params.data_dir} --settings {params.settings:q}"
        " --out-dir {output.models} --metrics {output.metrics} 2> {log}"
