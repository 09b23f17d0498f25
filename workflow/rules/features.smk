# Features: each model's vision/projected tokens and hidden states per clip, cached in HDF5.
# The draft is teacher-forced along the target's greedy answers, so it runs after the target.
FEATURES = f"{RESULTS}/features"
FEATURE_SETTINGS = as_json({**config["features"], **MODEL_RUNTIME})
FEATURE_CODE = command_code("extract-features")


rule extract_target_features:
    conda:
        ENV
    input:
        manifest=rules.build_tensors.output.manifest,
        tensors=rules.build_tensors.output.tensors,
        models=model_inputs(),
    output:
        f"{FEATURES}/video_llava.h5",
    params:
        checkpoint=model_paths()["target"],
        tokenizer=model_paths()["target_tokenizer"],
        data_dir=parent("manifest"),
        settings=FEATURE_SETTINGS,
        code=FEATURE_CODE,
    resources:
        gpu=1 if MODELS["device"] == "cuda" else 0,
    log:
        f"{LOGS}/extract_target_features.log",
    benchmark:
        f"{RESULTS}/benchmarks/extract_target_features.tsv"
    shell:
        "python -m evspec extract-features --model video_llava --checkpoint {params.checkpoint}"
        " --tokenizer {params.tokenizer} --data-dir {params.data_dir} --settings {params.settings:q}"
        " --out {output} 2> {log}"


rule extract_draft_features:
    conda:
        ENV
    input:
        manifest=rules.build_tensors.output.manifest,
        tensors=rules.build_tensors.output.tensors,
        models=model_inputs(),
        answers=rules.extract_target_features.output,
    output:
        f"{FEATURES}/eventgpt.h5",
    params:
        checkpoint=model_paths()["draft"],
        tokenizer=model_paths()["draft_tokenizer"],
        target_tokenizer=model_paths()["target_tokenizer"],
        data_dir=parent("manifest"),
        settings=FEATURE_SETTINGS,
        code=FEATURE_CODE,
    resources:
        gpu=1 if MODELS["device"] == "cuda" else 0,
    log:
        f"{LOGS}/extract_draft_features.log",
    benchmark:
        f"{RESULTS}/benchmarks/extract_draft_features.tsv"
    shell:
        "python -m evspec extract-features --model eventgpt --checkpoint {params.checkpoint}"
        " --tokenizer {params.tokenizer} --data-dir {params.data_dir} --settings {params.settings:q}"
        " --answers {input.answers} --target-tokenizer {params.target_tokenizer} --out {output} 2> {log}"
