"""The same DAG through a real SLURM (single node on loopback) gives the local run's results."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the LZ4 filter of tensors.h5)
import numpy as np
import pandas as pd
import pytest
from test_pipeline import TINY_CONFIG, snakemake

import slurm_cluster

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not slurm_cluster.available():
        pytest.skip("SLURM and munge are not installed (.ci/run installs them: slurmctld slurmd slurm-client munge)")
    with slurm_cluster.slurm_cluster(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def _deterministic(results) -> dict:
    """Everything a run produces except timings: data, model metrics, decoded ids."""
    with h5py.File(results / "data" / "tensors.h5") as handle:
        tensors = {name: handle[name][:] for name in ("event_images", "frames")}
    spec = pd.concat([pd.read_parquet(p) for p in sorted((results / "spec").glob("*/shard-*.parquet"))])
    return {
        "manifest": pd.read_parquet(results / "data" / "manifest.parquet"),
        "tensors": tensors,
        "toy": json.loads((results / "models" / "toy-metrics.json").read_text())["target"]["per_type"],
        "adapter": json.loads((results / "adapter" / "metrics.json").read_text())["rows"]["head"]["top1_agreement"],
        "ids": spec.sort_values(["method", "k", "sample_id"])[["method", "k", "sample_id", "output_ids"]],
    }


def test_slurm_run_submits_every_job_and_equals_the_local_run(cluster, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "slurm"
    local.mkdir()
    remote.mkdir()
    snakemake(local, config=TINY_CONFIG)
    command = ["--executor", "slurm", "--jobs", "4", "--latency-wait", "10", "--slurm-no-account",
               "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
               "--default-resources", "slurm_partition=debug", "mem_mb=1000", "runtime=20", "cpus_per_task=1",
               "--set-resources", "speculate:gpu=1"]  # fmt: skip
    snakemake(remote, *command, config=TINY_CONFIG, env=cluster)
    logs = list((remote / ".snakemake" / "slurm_logs").rglob("*.log"))
    rules_with_logs = {path.parts[path.parts.index("slurm_logs") + 1] for path in logs}
    assert {"rule_build_tensors", "rule_train_toy", "rule_speculate", "rule_report"} <= rules_with_logs, rules_with_logs
    controller_log = (Path(cluster["SLURM_CONF"]).parent / "slurmctld.log").read_text()
    finished = set(re.findall(r"_job_complete: JobId=(\d+) done", controller_log))
    assert len(finished) >= len(logs), (len(finished), len(logs))  # every job really ran under SLURM
    a, b = _deterministic(local / "results" / "tiny"), _deterministic(remote / "results" / "tiny")
    pd.testing.assert_frame_equal(a["manifest"], b["manifest"])
    for name in a["tensors"]:
        np.testing.assert_array_equal(a["tensors"][name], b["tensors"][name])
    assert a["toy"] == b["toy"] and a["adapter"] == b["adapter"]
    pd.testing.assert_frame_equal(a["ids"].reset_index(drop=True), b["ids"].reset_index(drop=True))
