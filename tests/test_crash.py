"""Crash safety: a SIGKILLed job never leaves output that looks done, and the rerun equals a clean run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_FEATURES_KW
from evspec.features.store import FeatureReader, partial_path

FIELDS = ("answer_ids", "hidden", "projected", "vision")


def _kill_when(command: list[str], ready, timeout_s: float = 120) -> None:
    """Start `command`, SIGKILL it as soon as `ready()` holds (or fail if it finishes first)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HDF5_USE_FILE_LOCKING": "FALSE"})  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"the job finished before it could be killed: {command}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the job never reached the point to kill it")
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_killed_feature_extraction_resumes_to_the_uninterrupted_result(tiny_pair_dir, tiny_data, tiny_features,
                                                                       tmp_path):  # fmt: skip
    out = tmp_path / "video_llava.h5"
    command = [sys.executable, "-m", "evspec", "extract-features", "--model", "video_llava",
               "--checkpoint", str(tiny_pair_dir / "target"), "--tokenizer", str(tiny_pair_dir / "target_tokenizer"),
               "--data-dir", str(tiny_data), "--out", str(out), "--settings", json.dumps({**TINY_FEATURES_KW,
                                                                                          "batch_clips": 1})]  # fmt: skip
    _kill_when(command, lambda: partial_path(out).exists() and partial_path(out).stat().st_size > 4096)
    assert not out.exists()  # nothing that looks done
    assert subprocess.run(command, capture_output=True).returncode == 0
    assert not partial_path(out).exists()
    ids = list(pd.read_parquet(tiny_data / "manifest.parquet")["sample_id"])
    resumed = FeatureReader(out).records(ids, FIELDS)
    clean = FeatureReader(tiny_features / "video_llava.h5").records(ids, FIELDS)
    for a, b in zip(resumed, clean):
        for name in FIELDS:
            np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.slow
def test_killed_training_leaves_no_model_and_the_rerun_completes(tiny_data, tmp_path):
    out, metrics = tmp_path / "toy", tmp_path / "toy-metrics.json"
    settings = {"steps": 400, "batch_size": 4, "shape": {"draft_image_size": 32, "target_image_size": 24,
                                                         "vision_hidden_size": 32, "hidden_size": 32}}  # fmt: skip
    command = [sys.executable, "-m", "evspec", "train-toy", "--data-dir", str(tiny_data), "--out-dir", str(out),
               "--metrics", str(metrics), "--settings", json.dumps(settings)]  # fmt: skip
    started = time.monotonic()
    _kill_when(command, lambda: time.monotonic() - started > 8)  # well inside the first model's training
    assert not out.exists() and not metrics.exists()
    assert not list(tmp_path.glob(".*tmp"))  # SIGKILL cannot clean up, but nothing is named as done
    settings["steps"] = 3
    command[-1] = json.dumps(settings)
    assert subprocess.run(command, capture_output=True).returncode == 0
    assert (out / "target" / "config.json").is_file() and json.loads(metrics.read_text())["target_accuracy"] >= 0


def test_unwritable_output_directory_is_a_clear_error(tiny_pair_dir, tiny_data):
    result = subprocess.run([sys.executable, "-m", "evspec", "extract-features", "--model", "video_llava",
                             "--checkpoint", str(tiny_pair_dir / "target"), "--tokenizer",
                             str(tiny_pair_dir / "target_tokenizer"), "--data-dir", str(tiny_data),
                             "--out", "/sys/evspec-test/video_llava.h5"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2
    assert "/sys/evspec-test/.video_llava.h5.partial: cannot write output" in result.stderr
