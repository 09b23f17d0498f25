# The toy pair (demo): both models trained on the synthetic world's train split.
rule train_toy:
    conda:
        ENV
    input:
        manifest=rules.build_tensors.output.manifest,
        tensors=rules.build_tensors.output.tensors,
    output:
        models=directory(TOY_DIR),
        metrics=f"{RESULTS}/models/toy-metrics.json",
    params:
        settings=as_json({**config["toy"], "device": MODELS["device"]}),
        data_dir=parent("manifest"),
        code=command_code("train-toy"),
    threads: config["toy"]["threads"]
    resources:
        gpu=1 if MODELS["device"] == "cuda" else 0,
    log:
        f"{LOGS}/train_toy.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_toy.tsv"
    shell:
        "python -m evspec train-toy --data-dir {params.data_dir} --settings {params.settings:q}"
        " --out-dir {output.models} --metrics {output.metrics} 2> {log}"
