"""Readers: exact windows, real data, and a clear error for every kind of bad file."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from evspec.errors import InputError
from evspec.events import Events, read_dsec_window, read_eventgpt_npy, read_nimagenet_npz
from evspec.h5 import blosc_zstd
from evspec.world.generate import T_OFFSET_US, write_dsec_events


def _write(path, x, y, t, p, *, height=48, width=64, duration_us=10_000):
    write_dsec_events(path, Events.from_arrays(x, y, t, p), height, width, duration_us)
    return path


@pytest.fixture
def small_file(tmp_path):
    t = np.array([0, 500, 999, 1000, 1000, 2500, 3999, 4000, 7000, 9999])
    n = len(t)
    return _write(tmp_path / "events.h5", np.arange(n), np.arange(n) % 48, t, np.arange(n) % 2), t


def test_window_is_half_open_and_on_image_clock(small_file):
    path, t_rel = small_file
    events = read_dsec_window(path, T_OFFSET_US + 1000, T_OFFSET_US + 4000)
    np.testing.assert_array_equal(events.t, t_rel[(t_rel >= 1000) & (t_rel < 4000)] + T_OFFSET_US)
    assert events.t.dtype == np.int64 and events.x.dtype == np.uint16 and events.p.dtype == np.uint8


@pytest.mark.parametrize("start, end", [(0, 10_000), (999, 1000), (1000, 1001), (2501, 3999), (4000, 10_001), (500, 7001)])
def test_window_matches_brute_force(small_file, start, end):
    path, t_rel = small_file
    events = read_dsec_window(path, T_OFFSET_US + start, T_OFFSET_US + end)
    expected = np.flatnonzero((t_rel >= start) & (t_rel < end))
    np.testing.assert_array_equal(events.x, expected)


def test_synthetic_recording_reads_whole_and_in_pieces(tiny_world):
    path = tiny_world / "seq-000" / "events" / "left" / "events.h5"
    whole = read_dsec_window(path, T_OFFSET_US, T_OFFSET_US + 1_000_000)
    pieces = [read_dsec_window(path, T_OFFSET_US + a, T_OFFSET_US + a + 50_000) for a in range(0, 1_000_000, 50_000)]
    assert len(whole) > 1000
    np.testing.assert_array_equal(np.concatenate([p.t for p in pieces]), whole.t)


def test_window_past_end_of_recording_is_refused(small_file):
    path, _ = small_file
    with pytest.raises(InputError, match="outside the recording"):
        read_dsec_window(path, T_OFFSET_US + 5000, T_OFFSET_US + 50_000)
    with pytest.raises(InputError, match="outside the recording"):
        read_dsec_window(path, 0, 10)


def test_empty_window_returns_no_events(small_file):
    path, _ = small_file
    assert len(read_dsec_window(path, T_OFFSET_US + 5000, T_OFFSET_US + 6000)) == 0


def test_unsorted_times_are_refused(tmp_path):
    path = tmp_path / "events.h5"
    _write(path, [1, 2, 3], [1, 2, 3], [100, 300, 200], [0, 1, 0])
    with pytest.raises(InputError, match=r"not sorted: t\[2\]=200 < t\[1\]=300"):
        read_dsec_window(path, T_OFFSET_US, T_OFFSET_US + 1000)


def test_coordinates_outside_sensor_are_refused(tmp_path):
    path = _write(tmp_path / "events.h5", [1, 64], [1, 2], [10, 20], [0, 1])
    with pytest.raises(InputError, match="outside the 64x48 sensor: x=64"):
        read_dsec_window(path, T_OFFSET_US, T_OFFSET_US + 1000)


def test_missing_dataset_is_named(small_file):
    path, _ = small_file
    with h5py.File(path, "r+") as handle:
        del handle["ms_to_idx"]
    with pytest.raises(InputError, match="dataset 'ms_to_idx' is missing"):
        read_dsec_window(path, T_OFFSET_US, T_OFFSET_US + 1000)


def test_truncated_file_is_refused(small_file, tmp_path):
    path, _ = small_file
    data = path.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated.h5"):
        read_dsec_window(truncated, T_OFFSET_US, T_OFFSET_US + 1000)


def test_corrupt_chunk_is_refused(tmp_path):
    path = tmp_path / "events.h5"
    n = 50_000
    t = np.sort(np.random.default_rng(0).integers(0, 9_000, n))
    _write(path, np.zeros(n), np.zeros(n), t, np.zeros(n))
    with h5py.File(path, "r") as handle:
        offset = handle["events/t"].id.get_chunk_info(0).byte_offset
    data = bytearray(path.read_bytes())
    data[offset + 16 : offset + 64] = b"\xff" * 48  # scramble the compressed stream
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="events.h5"):
        read_dsec_window(path, T_OFFSET_US, T_OFFSET_US + 9000)


def test_inconsistent_ms_index_is_refused(small_file):
    path, _ = small_file
    with h5py.File(path, "r+") as handle:
        handle["ms_to_idx"][4] = 0  # claims the 4 ms boundary is at event 0
    with pytest.raises(InputError, match="ms_to_idx"):
        read_dsec_window(path, T_OFFSET_US + 4000, T_OFFSET_US + 5000)


def test_not_hdf5_and_missing_file(tmp_path):
    bogus = tmp_path / "bogus.h5"
    bogus.write_text("hello")
    with pytest.raises(InputError, match="not a readable HDF5 file"):
        read_dsec_window(bogus, 0, 1)
    with pytest.raises(InputError, match="file not found"):
        read_dsec_window(tmp_path / "absent.h5", 0, 1)


def test_real_eventgpt_sample(eventgpt_sample):
    events = read_eventgpt_npy(eventgpt_sample)
    assert len(events) == 132_268
    assert events.x.max() == 639 and events.y.max() == 479
    assert events.t[0] == 0 and events.t[-1] == 49_595
    assert set(np.unique(events.p)) == {0, 1}


class _Exploit:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-evspec-test",))


def test_npy_with_code_is_refused_not_executed(tmp_path):
    path = tmp_path / "evil.npy"
    wrapper = np.empty((), dtype=object)
    wrapper[()] = {"x": np.zeros(2, np.uint16), "payload": _Exploit()}
    np.save(path, wrapper, allow_pickle=True)
    with pytest.raises(InputError, match="refusing to load 'shutil.rmtree'"):
        read_eventgpt_npy(path)


def test_npy_roundtrip_and_wrong_contents(tmp_path):
    good = tmp_path / "good.npy"
    sample = {"x": np.array([1, 2], np.uint16), "y": np.array([3, 4], np.uint16),
              "t": np.array([5, 6], np.uint16), "p": np.array([0, 1], np.uint8)}  # fmt: skip
    wrapper = np.empty((), dtype=object)
    wrapper[()] = sample
    np.save(good, wrapper, allow_pickle=True)
    events = read_eventgpt_npy(good)
    np.testing.assert_array_equal(events.t, [5, 6])
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros(3))
    with pytest.raises(InputError, match="expected a pickled dict"):
        read_eventgpt_npy(plain)
    keys = tmp_path / "keys.npy"
    wrapper[()] = {"x": np.zeros(1)}
    np.save(keys, wrapper, allow_pickle=True)
    with pytest.raises(InputError, match="keys x, y, t, p"):
        read_eventgpt_npy(keys)


def test_nimagenet_npz(tmp_path):
    path = tmp_path / "sample.npz"
    data = np.zeros(3, dtype=[("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "i1")])
    data["x"], data["y"], data["t"], data["p"] = [1, 2, 3], [4, 5, 6], [10, 20, 30], [-1, 1, -1]
    np.savez(path, event_data=data)
    events = read_nimagenet_npz(path)
    np.testing.assert_array_equal(events.p, [0, 1, 0])
    np.savez(path, other=data)
    with pytest.raises(InputError, match="'event_data' is missing"):
        read_nimagenet_npz(path)

