# Reports: Markdown + PNG figures rendered from the result files (and only from them).
REPORT_INPUTS = {
    "manifest": rules.build_tensors.output.manifest,
    "adapter": rules.train_adapter.output,
    "summary": rules.spec_summary.output,
    "stages": rules.bench_stages.output,
}
if TOY:
    REPORT_INPUTS["toy_metrics"] = rules.train_toy.output.metrics


rule report:
    conda:
        ENV
    input:
        **REPORT_INPUTS,
    output:
        report(directory(REPORTS), patterns=["{name}.png"], caption="../report/figures.rst", category="Figures"),
    params:
        results=parent("manifest", 2),
        config=as_json(config),
        models=as_json({"draft": model_paths()["draft"], "target": model_paths()["target"]}),
        code=command_code("report"),
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv",
    shell:
        "python -m evspec report --results {params.results} --config {params.config:q} --models {params.models:q}"
        " --out {output} 2> {log}"
