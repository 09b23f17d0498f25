"""Shared fixtures: a tiny synthetic world (built once per session) and the real EventGPT sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evspec.world.generate import WorldSettings, generate_world

PROJECT = Path(__file__).resolve().parents[1]
EVENTGPT_SAMPLE = PROJECT.parent / "shared" / "data" / "eventgpt_sample1.npy"

TINY_WORLD = WorldSettings(seed=7, n_sequences=4, duration_s=1.0, height=48, width=64,
                           radius_px=(4.0, 8.0), speed_px_s=(8.0, 20.0), internal_rate_hz=400.0)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A 4-sequence, 1-second, 64x48 world in the DSEC layout (read-only by convention)."""
    out = tmp_path_factory.mktemp("world") / "world"
    generate_world(out, TINY_WORLD)
    return out


@pytest.fixture(scope="session")
def eventgpt_sample() -> Path:
    if not EVENTGPT_SAMPLE.is_file():
        pytest.skip(f"real EventGPT sample not found at {EVENTGPT_SAMPLE} (shared data absent)")
    return EVENTGPT_SAMPLE


def random_events(rng: np.random.Generator, n: int, height: int, width: int, t_span_us: int = 50_000):
    """Sorted random events on a small sensor, so many land on the same pixel."""
    from evspec.events import Events

    t = np.sort(rng.integers(0, t_span_us, n))
    return Events.from_arrays(rng.integers(0, width, n), rng.integers(0, height, n), t, rng.integers(0, 2, n))


TINY_FEATURES_KW = dict(max_new_tokens=5, batch_clips=3)
TINY_TOY = dict(draft_image_size=32, target_image_size=24, patch_size=8, vision_hidden_size=32, vision_layers=1,
                hidden_size=32, layers=2)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_data(tiny_world, tmp_path_factory) -> Path:
    """The tiny world cut into clips: a data directory with manifest.parquet and tensors.h5."""
    from evspec.data.build import SplitSettings, build_tensors
    from evspec.data.clips import WindowSettings
    from evspec.data.recordings import DatasetSettings

    out = tmp_path_factory.mktemp("tiny_data")
    build_tensors(DatasetSettings(root=str(tiny_world)), WindowSettings(min_events=20, event_window_sweep_ms=(25,)),
                  SplitSettings(),
                  out / "manifest.parquet", out / "tensors.h5", out / "skipped.parquet")  # fmt: skip
    return out


@pytest.fixture(scope="session")
def tiny_pair_dir(tmp_path_factory) -> Path:
    """An untrained, seeded toy pair at test size, saved as checkpoints + tokenizers."""
    from evspec.models.toy import ToyShape, build_toy_pair, save_pair

    out = tmp_path_factory.mktemp("tiny_pair")
    save_pair(build_toy_pair(ToyShape(**TINY_TOY), n_event_images=5, seed=0), out)
    return out


@pytest.fixture(scope="session")
def tiny_features(tiny_pair_dir, tiny_data, tmp_path_factory) -> Path:
    """Both feature caches of the tiny pair on the tiny world (video_llava.h5, eventgpt.h5)."""
    from evspec.features.extract import extract_features

    out = tmp_path_factory.mktemp("features")
    from evspec.features.extract import FeatureSettings

    settings = FeatureSettings(**TINY_FEATURES_KW)
    extract_features("video_llava", tiny_pair_dir / "target", tiny_pair_dir / "target_tokenizer", tiny_data,
                     out / "video_llava.h5", settings)  # fmt: skip
    extract_features("eventgpt", tiny_pair_dir / "draft", tiny_pair_dir / "draft_tokenizer", tiny_data,
                     out / "eventgpt.h5", settings, out / "video_llava.h5", tiny_pair_dir / "target_tokenizer")  # fmt: skip
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, with the reason, where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The whole tiny DAG (test_pipeline's TINY_CONFIG) run once from clean, for every test that reads a finished
    run: the rerun checks, and the local run that a second run from clean and the SLURM run must equal."""
    from test_pipeline import TINY_CONFIG, snakemake

    workdir = tmp_path_factory.mktemp("tiny-run")
    snakemake(workdir, config=TINY_CONFIG)
    return workdir
