# Data stage: recordings (synthetic world or DSEC) -> clips -> manifest.parquet + tensors.h5.
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


rule synthesize_world:
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
        "{EVSPEC} synth --out {output} --world {params.world:q} --workers {threads} 2> {log}"


rule build_tensors:
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
        out_dir=f"{RESULTS}/data",
        code=command_code("build-tensors"),
    log:
        f"{LOGS}/build_tensors.log",
    benchmark:
        f"{RESULTS}/benchmarks/build_tensors.tsv"
    shell:
        "{EVSPEC} build-tensors --dataset {params.dataset:q} --windows {params.windows:q}"
        " --split {params.split:q} --out-dir {params.out_dir} 2> {log}"
