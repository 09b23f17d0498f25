# evspec: EventGPT drafts, Video-LLaVA verifies. This file is the table of contents;
# every rule lives in workflow/rules/ and calls one `python -m evspec <command>`.
from pathlib import Path

from snakemake.utils import min_version, validate

from evspec.config_checks import check_config

min_version("9.0")

PROJECT = Path(workflow.basedir)


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")
check_config(config)  # the rules across keys, before any job


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/adapter.smk"
include: "workflow/rules/speculative.smk"
include: "workflow/rules/bench.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        rules.build_tensors.output,
        rules.report.output,
    default_target: True
