"""The data stage: clip planning, splits, the manifest/tensors contract, and bad recordings."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from evspec.__main__ import main
from evspec.data.build import SplitSettings, build_tensors
from evspec.data.clips import WindowSettings, assign_splits, plan_clips
from evspec.data.recordings import DatasetSettings
from evspec.errors import InputError
from evspec.events import Events, eventgpt_images, read_dsec_window
from evspec.h5 import open_h5
from evspec.world.generate import write_dsec_events
from evspec.world.scene import QUESTIONS, answer, scene_from_dict

WINDOWS = WindowSettings(min_events=20)


def _build(root, out_dir, windows=WINDOWS, **dataset):
    return build_tensors(DatasetSettings(root=str(root), **dataset), windows, SplitSettings(),
                         out_dir / "manifest.parquet", out_dir / "tensors.h5", out_dir / "skipped.parquet")  # fmt: skip


@pytest.fixture(scope="module")
def built(tiny_world, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("data")
    _build(tiny_world, out_dir)
    return out_dir


def test_plan_clips_steps_by_duration_minus_overlap():
    frame_times = np.arange(0, 2_000_001, 50_000)
    clips = plan_clips("s", frame_times, WindowSettings())
    assert [c.t_start_us for c in clips] == list(range(0, 1_500_001, 250_000))
    clip = clips[0]
    assert (clip.event_start_us, clip.event_end_us) == (450_000, 500_000)
    assert clip.frame_indices == (0, 1, 3, 4, 5, 6, 8, 9)  # 8 of the 10 frames in [0, 500 ms)
    assert clip.single_frame_index == 9


def test_window_settings_refuse_eventgpt_incompatible_windows():
    with pytest.raises(ValueError, match="event_window_ms"):
        WindowSettings(event_window_ms=100)
    with pytest.raises(ValueError, match="overlap"):
        WindowSettings(clip_overlap_ms=500)


def test_splits_are_disjoint_deterministic_and_order_free():
    names = [f"s{i}" for i in range(20)]
    fractions = {"train": 0.7, "val": 0.1, "test": 0.2}
    a = assign_splits(names, fractions, seed=3)
    assert a == assign_splits(list(reversed(names)), fractions, seed=3)
    assert sorted(a) == sorted(names)
    assert {split: list(a.values()).count(split) for split in fractions} == {"train": 14, "val": 2, "test": 4}
    assert set(assign_splits(names[:3], fractions, seed=0).values()) == {"train", "val", "test"}


def test_manifest_and_tensors_agree(built, tiny_world):
    manifest = pd.read_parquet(built / "manifest.parquet")
    assert len(manifest) == 4 * 3  # 1 s recordings, 500 ms clips every 250 ms
    assert manifest.groupby("sequence")["split"].nunique().max() == 1  # no sequence in two splits
    with open_h5(built / "tensors.h5") as handle:
        ids = handle["sample_id"].asstr()[:]
        assert list(ids[manifest.tensor_index]) == list(manifest.sample_id)
        assert handle["event_images"].shape == (12, 5, 3, 48, 64)
        assert handle["frames"].shape == (12, 8, 3, 48, 64)
        assert handle["frame_single"].shape == (12, 1, 3, 48, 64)
        row = manifest.iloc[5]
        stored_images = handle["event_images"][row.tensor_index]
        stored_frames = handle["frames"][row.tensor_index]
    events_path = tiny_world / row.sequence / "events" / "left" / "events.h5"
    events = read_dsec_window(events_path, row.event_start_us, row.event_end_us)
    assert len(events) == row.n_events
    np.testing.assert_array_equal(stored_images, eventgpt_images(events, 5, 48, 64).transpose(0, 3, 1, 2))
    clip = plan_clips(row.sequence, np.loadtxt(tiny_world / row.sequence / "images/timestamps.txt", dtype=np.int64),
                      WINDOWS)[row.clip_index]  # fmt: skip
    first = np.asarray(Image.open(tiny_world / row.sequence / f"images/left/rectified/{clip.frame_indices[0]:06d}.png"))
    np.testing.assert_array_equal(stored_frames[0], first.transpose(2, 0, 1))


def test_event_window_sweep_writes_each_window_ending_where_the_drafts_ends(built, tiny_world, tmp_path):
    """Each swept window is the last `ms` of the draft's window's end, as EventGPT's images (zeros, with the count
    in the manifest, where it holds fewer events than images); the draft's own window is unchanged by the sweep."""
    _build(tiny_world, tmp_path, WindowSettings(min_events=20, event_window_sweep_ms=(1, 25, 75)))
    manifest = pd.read_parquet(tmp_path / "manifest.parquet")
    unswept = pd.read_parquet(built / "manifest.parquet")
    pd.testing.assert_frame_equal(manifest[unswept.columns], unswept)
    with open_h5(tmp_path / "tensors.h5") as handle, open_h5(built / "tensors.h5") as reference:
        np.testing.assert_array_equal(handle["event_images"][:], reference["event_images"][:])
        for ms in (1, 25, 75):
            stored = handle[f"event_images_{ms}ms"][:]
            assert stored.shape == (12, 5, 3, 48, 64)
            for row in manifest.itertuples():
                events_path = tiny_world / row.sequence / "events" / "left" / "events.h5"
                events = read_dsec_window(events_path, row.event_end_us - 1000 * ms, row.event_end_us)
                assert getattr(row, f"n_events_{ms}ms") == len(events)
                expected = eventgpt_images(events, 5, 48, 64).transpose(0, 3, 1, 2) if len(events) >= 5 else 0
                np.testing.assert_array_equal(stored[row.tensor_index], expected + np.zeros_like(stored[0]))
    assert (manifest["n_events_1ms"] < 5).any() and (manifest["n_events_1ms"] >= 5).any()  # both kinds checked
    assert (manifest["n_events_75ms"] > manifest["n_events"]).all()


@pytest.mark.parametrize("sweep, problem", [((100,), "must be in"), ((50,), "other lengths"), ((10, 10), "each once"),
                                            ((70,), "cannot exceed clip_duration_ms")])  # fmt: skip
def test_event_window_sweep_stays_in_eventgpts_regime(sweep, problem):
    with pytest.raises(ValueError, match=problem):
        WindowSettings(clip_duration_ms=60, clip_overlap_ms=0, event_window_sweep_ms=sweep)


def test_questions_answered_from_ground_truth(built, tiny_world):
    manifest = pd.read_parquet(built / "manifest.parquet")
    assert set(manifest.question_type) == set(QUESTIONS)
    for row in manifest.itertuples():
        scene = scene_from_dict(json.loads((tiny_world / row.sequence / "annotations.json").read_text()))
        assert row.question == QUESTIONS[row.question_type]
        middle_s = (row.t_start_us + row.t_end_us) / 2e6  # "describe" places the objects at the clip's middle
        assert row.answer == answer(scene, row.question_type, middle_s, 48, 64)
        assert row.gt_shape == scene.objects[0].shape


def test_sparse_windows_are_recorded_as_skipped(built, tiny_world, tmp_path):
    n_events = pd.read_parquet(built / "manifest.parquet").n_events
    threshold = int(n_events.median())
    manifest = _build(tiny_world, tmp_path, WindowSettings(min_events=threshold))
    skipped = pd.read_parquet(tmp_path / "skipped.parquet")
    assert len(manifest) + len(skipped) == len(n_events)
    assert (skipped.n_events < threshold).all() and (manifest.n_events >= threshold).all()
    with pytest.raises(ValueError, match="every clip was skipped"):
        _build(tiny_world, tmp_path / "none", WindowSettings(min_events=10**9))
    assert not (tmp_path / "none" / "tensors.h5").exists()


def _copy_world(tiny_world, tmp_path):
    root = tmp_path / "world"
    shutil.copytree(tiny_world, root)
    return root


def _assert_nothing_written(out_dir):
    assert not out_dir.exists() or not any(out_dir.iterdir()), list(out_dir.iterdir())


def test_missing_frame_is_named_and_nothing_is_written(tiny_world, tmp_path):
    root = _copy_world(tiny_world, tmp_path)
    (root / "seq-002/images/left/rectified/000004.png").unlink()
    with pytest.raises(InputError, match="seq-002.*20 frames but 21 timestamps"):
        _build(root, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_frame_of_wrong_size_is_named(tiny_world, tmp_path):
    root = _copy_world(tiny_world, tmp_path)
    Image.new("RGB", (32, 24)).save(root / "seq-001/images/left/rectified/000009.png")
    with pytest.raises(InputError, match="000009.png: frame size"):
        _build(root, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_recording_shorter_than_its_frames_is_refused(tiny_world, tmp_path):
    root = _copy_world(tiny_world, tmp_path)
    path = root / "seq-003/events/left/events.h5"
    events = read_dsec_window(path, 1_000_000, 1_600_000)
    short = Events.from_arrays(events.x, events.y, events.t - 1_000_000, events.p)
    path.unlink()
    write_dsec_events(path, short, 48, 64, duration_us=600_000)
    with pytest.raises(InputError, match="seq-003.*outside the recording"):
        _build(root, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_corrupt_event_file_is_named(tiny_world, tmp_path):
    root = _copy_world(tiny_world, tmp_path)
    path = root / "seq-000/events/left/events.h5"
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(InputError, match="seq-000/events/left/events.h5: not a readable HDF5 file"):
        _build(root, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_dsec_kind_asks_configured_questions_without_answers(tiny_world, tmp_path):
    manifest = _build(tiny_world, tmp_path, kind="dsec", questions=("Q one?", "Q two?"))
    assert set(manifest.question) == {"Q one?", "Q two?"}
    assert manifest.answer.isna().all() and manifest.gt_shape.isna().all()


def test_cli_reports_bad_settings_by_key(tiny_world, tmp_path, caplog):
    code = main(["build-tensors", "--root", str(tiny_world), "--out-dir", str(tmp_path),
                 "--windows", json.dumps({"event_window": 50})])  # fmt: skip
    assert code == 2
    assert "--windows: unknown keys ['event_window']" in caplog.text
    code = main(["build-tensors", "--root", str(tiny_world), "--out-dir", str(tmp_path),
                 "--windows", json.dumps({"n_frames": "eight"})])  # fmt: skip
    assert code == 2 and "--windows.n_frames: expected int" in caplog.text


def test_tensors_file_is_chunked_per_clip_compressed_and_checksummed(built):
    with h5py.File(built / "tensors.h5", "r") as handle:
        for name in ("event_images", "frames", "frame_single"):
            dataset = handle[name]
            assert dataset.chunks == (1, *dataset.shape[1:])
            plist = dataset.id.get_create_plist()
            filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
            assert filters == {32004, h5py.h5z.FILTER_FLETCHER32}, name  # LZ4 (hdf5plugin's id) and Fletcher-32
