# Speculative evaluation: every method on every held-out clip, sharded (one job per shard,
# each asking for one GPU when models run on CUDA), then one summary over all shards.
SPEC = f"{RESULTS}/spec"
SPEC_CONFIG = config["speculative"]
SPEC_SHARDS = range(SPEC_CONFIG["shards"])


rule speculate:
    conda:
        ENV
    input:
        manifest=rules.build_tensors.output.manifest,
        tensors=rules.build_tensors.output.tensors,
        models=model_inputs(),
        adapter=rules.train_adapter.output,
    output:
        shards=expand(f"{SPEC}/{{method}}/shard-{{{{shard}}}}.parquet", method=SPEC_CONFIG["methods"]),
    params:
        paths=model_paths(),
        data_dir=parent("manifest"),
        out_dir=parent("shards", 2),
        n_shards=SPEC_CONFIG["shards"],
        settings=as_json({key: value for key, value in SPEC_CONFIG.items() if key != "shards"}
                         | MODEL_RUNTIME),
        code=command_code("speculate"),
    threads: SPEC_CONFIG["threads"]
    resources:
        # one GPU per shard; two when the draft has its own (speculative.draft_device)
        gpu=(2 if SPEC_CONFIG["draft_device"] else 1) if MODELS["device"] == "cuda" else 0,
    log:
        f"{LOGS}/speculate/shard-{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/speculate/shard-{{shard}}.tsv"
    shell:
        "python -m evspec speculate --data-dir {params.data_dir} --draft {params.paths[draft]}"
        " --target {params.paths[target]} --draft-tokenizer {params.paths[draft_tokenizer]}"
        " --target-tokenizer {params.paths[target_tokenizer]} --adapter-dir {input.adapter}"
        " --settings {params.settings:q} --shard {wildcards.shard} --n-shards {params.n_shards}"
        " --out-dir {params.out_dir} 2> {log}"


rule spec_summary:
    conda:
        ENV
    input:
        shards=expand(f"{SPEC}/{{method}}/shard-{{shard}}.parquet", method=SPEC_CONFIG["methods"], shard=SPEC_SHARDS),
        manifest=f"{RESULTS}/data/manifest.parquet",
    output:
        summary=f"{SPEC}/summary.json",
        clips=f"{SPEC}/clips.parquet",
    params:
        spec_dir=parent("shards", 2),
        code=command_code("spec-summary"),
    log:
        f"{LOGS}/spec_summary.log",
    benchmark:
        f"{RESULTS}/benchmarks/spec_summary.tsv",
    shell:
        "python -m evspec spec-summary --spec-dir {params.spec_dir} --manifest {input.manifest} --out {output.summary}"
        " --clips {output.clips} 2> {log}"
