# evspec: EventGPT drafts, Video-LLaVA verifies. This file is the table of contents;
# every rule lives in workflow/rules/ and calls one `python -m evspec <command>`.
import os
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

PROJECT = Path(workflow.basedir)
# this checkout's evspec, for the Snakefile (config checks, code fingerprints) and every job alike, whether
# evspec is installed editable, installed as a copy, or not at all (a rule's conda env holds only its dependencies)
sys.path.insert(0, str(PROJECT / "src"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT / "src"), os.environ.get("PYTHONPATH")]))

from evspec.config_checks import check_config  # noqa: E402  (after the path above)


envvars:  # both set above (and passed on to cluster jobs)
    "PATH",
    "PYTHONPATH",



configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"  # the HTML report's description of the workflow


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


# light jobs run where Snakemake runs, not as cluster jobs
localrules:
    spec_summary,
    report,


rule all:
    input:
        rules.build_tensors.output,
        rules.report.output,
    default_target: True
