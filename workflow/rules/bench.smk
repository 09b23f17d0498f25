# Stage timing: vision / projector / prefill / decode of both models through the stage API.
# bench.scale "pair" times the run's own pair (the demo's toy pair on CPU, or the checkpoints);
# "7b" times 7B shapes with random weights (GPU).
BENCH = config["bench"]


rule bench_stages:
    conda:
        ENV
    input:
        models=model_inputs() if BENCH["scale"] == "pair" else [],
    output:
        f"{RESULTS}/bench/stages.parquet",
    params:
        settings=as_json(BENCH | {"device": MODELS["device"], "dtype": MODELS["dtype"], "compile": MODELS["compile"]}),
        pair=(" ".join(f"--{part.replace('_', '-')} {path}" for part, path in model_paths().items())
              if BENCH["scale"] == "pair" else ""),
        code=command_code("bench-stages"),
    threads: BENCH["threads"]
    resources:
        gpu=1 if MODELS["device"] == "cuda" else 0,
    log:
        f"{LOGS}/bench_stages.log",
    benchmark:
        f"{RESULTS}/benchmarks/bench_stages.tsv"
    shell:
        "python -m evspec bench-stages --settings {params.settings:q} {params.pair} --out {output} 2> {log}"
