# Speculative evaluation: every method on every held-out clip, sharded (one job per shard,
# each asking for one GPU when models run on CUDA), then one summary over all shards.
SPECULATE = (
    "python -m evspec speculate --data-dir {params.data_dir} --draft {params.paths[draft]}"
    " --target {params.paths[target]} --draft-tokenizer {params.paths[draft_tokenizer]}"
    " --target-tokenizer {params.paths[target_tokenizer]} --adapter-dir {input.adapter}"
    " --settings {params.settings:q} --shard {wildcards.shard} --n-shards {params.n_shards}"
    " --out-dir {params.out_dir} 2> {log}"
)


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
        settings=speculate_settings(SPEC_CONFIG["split"], SPEC_CONFIG["methods"]),
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
        SPECULATE


use rule speculate as speculate_selection with:
    output:
        shards=expand(f"{SELECTION}/{{method}}/shard-{{{{shard}}}}.parquet", method=SELECTION_METHODS),
    params:
        paths=model_paths(),
        data_dir=parent("manifest"),
        out_dir=parent("shards", 2),
        n_shards=SPEC_CONFIG["shards"],
        settings=speculate_settings(SPEC_CONFIG["selection_split"] or SPEC_CONFIG["split"], SELECTION_METHODS,
                                    lossless_draws=0),  # the distribution test runs on the evaluated split
        code=command_code("speculate"),
    log:
        f"{LOGS}/speculate_selection/shard-{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/speculate_selection/shard-{{shard}}.tsv"


use rule speculate as speculate_window with:
    output:
        shards=expand(f"{SPEC}/window-{{{{window_ms}}}}ms/{{method}}/shard-{{{{shard}}}}.parquet", method=WINDOW_METHODS),
    params:
        paths=model_paths(),
        data_dir=parent("manifest"),
        out_dir=parent("shards", 2),
        n_shards=SPEC_CONFIG["shards"],
        settings=lambda wildcards: speculate_settings(SPEC_CONFIG["split"], WINDOW_METHODS, lossless_draws=0,
                                                      event_window_ms=int(wildcards.window_ms)),
        code=command_code("speculate"),
    log:
        f"{LOGS}/speculate_window/{{window_ms}}ms/shard-{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/speculate_window/{{window_ms}}ms/shard-{{shard}}.tsv"


use rule speculate as speculate_tree with:
    output:
        shards=expand(f"{SPEC}/tree-{{{{tree_top_k}}}}x{{{{tree_nodes}}}}/{{method}}/shard-{{{{shard}}}}.parquet",
                      method=TREE_METHODS),
    params:
        paths=model_paths(),
        data_dir=parent("manifest"),
        out_dir=parent("shards", 2),
        n_shards=SPEC_CONFIG["shards"],
        settings=lambda wildcards: speculate_settings(SPEC_CONFIG["split"], TREE_METHODS, lossless_draws=0,
                                                      tree_top_k=int(wildcards.tree_top_k),
                                                      tree_nodes=int(wildcards.tree_nodes)),
        code=command_code("speculate"),
    log:
        f"{LOGS}/speculate_tree/{{tree_top_k}}x{{tree_nodes}}/shard-{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/speculate_tree/{{tree_top_k}}x{{tree_nodes}}/shard-{{shard}}.tsv"


use rule speculate as speculate_link with:
    output:
        shards=expand(f"{SPEC}/link-{{{{rtt_ms}}}}ms/{{method}}/shard-{{{{shard}}}}.parquet", method=LINK_METHODS),
    params:
        paths=model_paths(),
        data_dir=parent("manifest"),
        out_dir=parent("shards", 2),
        n_shards=SPEC_CONFIG["shards"],
        settings=lambda wildcards: speculate_settings(
            SPEC_CONFIG["split"], LINK_METHODS, lossless_draws=0, link_rtt_ms=int(wildcards.rtt_ms),
            link_bandwidth_mbit_s=EDGE["bandwidth_mbit_s"], draft_ahead=EDGE["draft_ahead"],
            max_clips=EDGE["max_clips"] or SPEC_CONFIG["max_clips"],
            draft_device=EDGE["draft_device"] or SPEC_CONFIG["draft_device"]),
        code=command_code("speculate"),
    resources:
        gpu=(2 if EDGE["draft_device"] or SPEC_CONFIG["draft_device"] else 1) if MODELS["device"] == "cuda" else 0,
    log:
        f"{LOGS}/speculate_link/{{rtt_ms}}ms/shard-{{shard}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/speculate_link/{{rtt_ms}}ms/shard-{{shard}}.tsv"


rule spec_summary:
    conda:
        ENV
    input:
        shards=expand(f"{SPEC}/{{method}}/shard-{{shard}}.parquet", method=SPEC_CONFIG["methods"], shard=SPEC_SHARDS),
        manifest=f"{RESULTS}/data/manifest.parquet",
        selection=expand(f"{SELECTION}/{{method}}/shard-{{shard}}.parquet", method=SELECTION_METHODS,
                         shard=SPEC_SHARDS) if SELECTING else [],
        windows=expand(f"{SPEC}/window-{{window_ms}}ms/{{method}}/shard-{{shard}}.parquet", window_ms=WINDOW_SWEEP,
                       method=WINDOW_METHODS, shard=SPEC_SHARDS),
        trees=[f"{SPEC}/tree-{top_k}x{nodes}/{method}/shard-{shard}.parquet" for top_k, nodes in TREE_SWEEP
               for method in TREE_METHODS for shard in SPEC_SHARDS],
        links=expand(f"{SPEC}/link-{{rtt_ms}}ms/{{method}}/shard-{{shard}}.parquet", rtt_ms=LINK_SWEEP,
                     method=LINK_METHODS, shard=SPEC_SHARDS),
    output:
        summary=f"{SPEC}/summary.json",
        clips=f"{SPEC}/clips.parquet",
    params:
        spec_dir=parent("shards", 2),
        selection=f"--selection-dir {SELECTION} --selection-split {SPEC_CONFIG['selection_split']}" if SELECTING else "",
        windows=lambda wildcards, input: " ".join(f"--window-dir {ms}={Path(input.windows[0]).parents[2]}/window-{ms}ms"
                                                  for ms in WINDOW_SWEEP),
        trees=lambda wildcards, input: " ".join(
            [f"--tree-shape {SPEC_CONFIG['tree_top_k']}x{SPEC_CONFIG['tree_nodes']}"] * bool(TREE_SWEEP)
            + [f"--tree-dir {t}x{n}={Path(input.trees[0]).parents[2]}/tree-{t}x{n}" for t, n in TREE_SWEEP]),
        links=lambda wildcards, input: " ".join(f"--link-dir {rtt}={Path(input.links[0]).parents[2]}/link-{rtt}ms"
                                                for rtt in LINK_SWEEP),
        code=command_code("spec-summary"),
    log:
        f"{LOGS}/spec_summary.log",
    benchmark:
        f"{RESULTS}/benchmarks/spec_summary.tsv",
    shell:
        "python -m evspec spec-summary --spec-dir {params.spec_dir} --manifest {input.manifest} --out {output.summary}"
        " --clips {output.clips} {params.selection} {params.windows} {params.trees} {params.links} 2> {log}"
