# Stage timing: vision / projector / prefill / decode of both models through the stage API.
# bench.scale "pair" times the run's own pair (the demo's toy pair on CPU, or the checkpoints);
# "7b" times 7B shapes with random weights (GPU). At the pair's scale the draft head timed is the trained one,
# so stages.md's head and c are those of the head `speculate` runs.
BENCH = config["bench"]
PAIR_SCALE = BENCH["scale"] == "pair"


rule bench_stages:
    conda:
        ENV
    input:
        models=model_inputs() if PAIR_SCALE else [],
        adapter=rules.train_adapter.output if PAIR_SCALE else [],
    output:
        f"{RESULTS}/bench/stages.parquet",
    params:
        # the head's tree timed as feature-tree drafts it: its (deepest) depth and the run's tree shape
        settings=as_json(BENCH | {"device": MODELS["device"], "dtype": MODELS["dtype"], "compile": MODELS["compile"],
                                  "head_tree": [max(SPEC_CONFIG["draft_lengths"].get("feature-tree", [4])),
                                                SPEC_CONFIG["tree_top_k"], SPEC_CONFIG["tree_nodes"]]}),
        pair=(" ".join(f"--{part.replace('_', '-')} {path}" for part, path in model_paths().items())
              if PAIR_SCALE else ""),
        head=lambda wildcards, input: f"--head {input.adapter}/head.safetensors" if PAIR_SCALE else "",
        code=command_code("bench-stages"),
    threads: BENCH["threads"]
    resources:
        gpu=1 if MODELS["device"] == "cuda" else 0,
    log:
        f"{LOGS}/bench_stages.log",
    benchmark:
        f"{RESULTS}/benchmarks/bench_stages.tsv"
    shell:
        "python -m evspec bench-stages --settings {params.settings:q} {params.pair} {params.head} --out {output} 2> {log}"
