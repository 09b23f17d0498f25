# Adapter stage: align the draft's hidden states with the target's, and train the cross-modal
# draft head (and its text-only ablation) on the cached features. Metrics are held-out only.
ADAPTER = f"{RESULTS}/adapter"


rule train_adapter:
    conda:
        ENV
    input:
        target_features=rules.extract_target_features.output,
        draft_features=rules.extract_draft_features.output,
        manifest=rules.build_tensors.output.manifest,
        models=model_inputs(),
    output:
        directory(ADAPTER),
    params:
        features_dir=parent("target_features"),
        data_dir=parent("manifest"),
        target=model_paths()["target"],
        draft=model_paths()["draft"],
        feature_settings=FEATURE_SETTINGS,
        settings=as_json({**config["adapter"], "device": MODELS["device"]}),
        code=command_code("train-adapter"),
    threads: config["adapter"]["threads"]
    resources:
        gpu=1 if MODELS["device"] == "cuda" else 0,
    log:
        f"{LOGS}/train_adapter.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_adapter.tsv"
    shell:
        "python -m evspec train-adapter --features-dir {params.features_dir} --data-dir {params.data_dir}"
        " --target {params.target} --draft {params.draft} --feature-settings {params.feature_settings:q}"
        " --settings {params.settings:q} --out-dir {output} 2> {log}"
