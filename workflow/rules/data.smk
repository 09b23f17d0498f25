# Data stage: recordings (synthetic world or DSEC) -> clips -> manifest.parquet + tensors.h5.
rule synthesize_world:
    conda:
        ENV
    output:
        directory(f"{RESULTS}/world"),
    params:
        world=as_json(config["world"]),
        code=command_code("synth"),
    threads: 2
    log:
        f"{LOGS}/synthesize_world.log",
    benchmark:
        f"{RESULTS}/benchmarks/synthesize_world.tsv"
    shell:
        "python -m evspec synth --out {output} --world {params.world:q} --workers {threads} 2> {log}"


rule build_tensors:
    conda:
        ENV
    input:
        dataset_inputs(),
    output:
        manifest=f"{RESULTS}/data/manifest.parquet",
        tensors=f"{RESULTS}/data/tensors.h5",
        skipped=f"{RESULTS}/data/skipped.parquet",
    params:
        dataset=as_json({**DATASET, "root": dataset_root()}),
        windows=as_json(config["windows"]),
        split=as_json(config["split"]),
        out_dir=parent("manifest"),
        code=command_code("build-tensors"),
    log:
        f"{LOGS}/build_tensors.log",
    benchmark:
        f"{RESULTS}/benchmarks/build_tensors.tsv"
    shell:
        "python -m evspec build-tensors --dataset {params.dataset:q} --windows {params.windows:q}"
        " --split {params.split:q} --out-dir {params.out_dir} 2> {log}"
