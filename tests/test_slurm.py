"""The same DAG through a real SLURM (single node on loopback) gives the local run's results."""

from __future__ import annotations

import pytest
from test_pipeline import NO_LINK, TINY_CONFIG, deterministic_digests, snakemake

import slurm_cluster
from conftest import PROJECT

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.available()
    if reason:
        pytest.skip(f"no test SLURM: {reason}")
    with slurm_cluster.slurm_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def test_slurm_run_submits_every_job_and_equals_the_local_run(cluster, tiny_run, tmp_path):
    """Against the shared local run (`tiny_run`); without the edge-cloud runs, whose products the digests do not
    read (and which change no other job's parameters)."""
    local, remote = tiny_run, tmp_path / "slurm"
    remote.mkdir()
    # the shipped profile, with what this one-node test cluster needs instead of a real cluster's sizes
    command = ["--profile", str(PROJECT / "profiles" / "slurm"), "--jobs", "4", "--latency-wait", "10",
               "--slurm-no-account", "--slurm-keep-successful-logs", "--slurm-status-command", "squeue",
               "--slurm-init-seconds-before-status-checks", "2",
               "--default-resources", "slurm_partition=debug", "mem_mb=1000", "runtime=20", "cpus_per_task=1",
               "--set-resources", "speculate:gpu=1"]  # fmt: skip
    snakemake(remote, *command, config={**TINY_CONFIG, "speculative": NO_LINK}, env=cluster.env)
    logs = list((remote / ".snakemake" / "slurm_logs").rglob("*.log"))
    rules_with_logs = {path.parts[path.parts.index("slurm_logs") + 1] for path in logs}
    assert {"rule_build_tensors", "rule_train_toy", "rule_speculate", "rule_bench_stages"} <= rules_with_logs, rules_with_logs
    assert not {"rule_spec_summary", "rule_report"} & rules_with_logs  # light jobs run where Snakemake runs
    assert len(cluster.finished_jobs) >= len(logs), (cluster.finished_jobs, logs)  # every job really ran under SLURM
    assert deterministic_digests(local / "results/tiny") == deterministic_digests(remote / "results/tiny")
