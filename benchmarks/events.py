"""Event representation throughput on one core, against a naive loop, tonic, and the memory floor.

    .venv/bin/python benchmarks/events.py [--events 10000000] [--repeats 5]

Times evspec's numba kernels on random sorted events on a 640x480 sensor (DSEC's),
after a warm-up call that also JIT-compiles. Baselines in the same run:
- naive: the per-event Python loop of each rule, timed on a slice and reported as a rate;
- tonic (pip install evspec[bench]): `to_frame_numpy(n_event_bins=1)` for the histogram
  and `to_voxel_grid_numpy` for the voxel grid (tonic's voxel variant normalises time to
  n_bins rather than n_bins - 1, so its output differs; the work is the same);
- floor: bytes each kernel must read (x, y, p and, for the voxel grid, t) over the
  single-thread copy bandwidth measured here.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from evspec.events import Events, eventgpt_images, polarity_histogram, voxel_grid  # noqa: E402

HEIGHT, WIDTH = 480, 640


def best_seconds(function, repeats: int) -> float:
    function()  # warm-up (JIT compile, page faults) excluded
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth_bytes_per_s(repeats: int) -> float:
    """Single-thread read+write bandwidth of a 256 MB copy (bytes moved counted once each way)."""
    source = np.ones(32 * 2**20, dtype=np.float64)
    target = np.empty_like(source)
    seconds = best_seconds(lambda: np.copyto(target, source), repeats)
    return 2 * source.nbytes / seconds


def naive_histogram(events: Events) -> np.ndarray:
    counts = np.zeros((2, HEIGHT, WIDTH), np.int32)
    for x, y, p in zip(events.x.tolist(), events.y.tolist(), events.p.tolist(), strict=True):
        counts[p, y, x] += 1
    return counts


def naive_images(events: Events, n_images: int = 5) -> np.ndarray:
    images = np.full((n_images, HEIGHT, WIDTH, 3), 255, np.uint8)
    size = len(events) // n_images
    colours = ((0, 0, 255), (255, 0, 0))
    for i, (x, y, p) in enumerate(zip(events.x.tolist(), events.y.tolist(), events.p.tolist(), strict=True)):
        images[min(i // size, n_images - 1), y, x] = colours[p]
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--naive-events", type=int, default=200_000, help="slice timed for the Python loops")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    n = args.events
    events = Events.from_arrays(rng.integers(0, WIDTH, n), rng.integers(0, HEIGHT, n),
                                np.sort(rng.integers(0, 50_000, n)), rng.integers(0, 2, n))  # fmt: skip
    sample = events.slice(0, args.naive_events)
    bandwidth = copy_bandwidth_bytes_per_s(args.repeats)
    bytes_xyp = events.x.itemsize + events.y.itemsize + events.p.itemsize

    try:
        import tonic.functional as tonic_functional

        structured = np.zeros(n, dtype=[("x", "<i8"), ("y", "<i8"), ("t", "<i8"), ("p", "<i8")])
        structured["x"], structured["y"], structured["t"], structured["p"] = events.x, events.y, events.t, events.p
        sensor = (WIDTH, HEIGHT, 2)
        tonic_histogram = lambda: tonic_functional.to_frame_numpy(structured, sensor, n_event_bins=1)  # noqa: E731
        tonic_voxels = lambda: tonic_functional.to_voxel_grid_numpy(structured.copy(), sensor, 5)  # noqa: E731
    except ImportError:
        tonic_histogram = tonic_voxels = None

    rows = []
    cases = [
        ("polarity_histogram", lambda: polarity_histogram(events, HEIGHT, WIDTH), naive_histogram, tonic_histogram, bytes_xyp),
        ("eventgpt_images", lambda: eventgpt_images(events, 5, HEIGHT, WIDTH), naive_images, None, bytes_xyp),
        ("voxel_grid(5)", lambda: voxel_grid(events, 5, HEIGHT, WIDTH), None, tonic_voxels, bytes_xyp + events.t.itemsize),
    ]  # fmt: skip
    for name, run, naive, tonic_run, bytes_per_event in cases:
        rate = n / best_seconds(run, args.repeats)
        naive_rate = args.naive_events / best_seconds(lambda: naive(sample), 1) if naive else None
        tonic_rate = n / best_seconds(tonic_run, 1) if tonic_run else None
        floor_rate = bandwidth / 2 / bytes_per_event  # read-only traffic: half the copy's two-way figure
        rows.append({"kernel": name, "evspec_Mev_s": rate / 1e6,
                     "naive_Mev_s": naive_rate / 1e6 if naive_rate else None,
                     "tonic_Mev_s": tonic_rate / 1e6 if tonic_rate else None,
                     "floor_Mev_s": floor_rate / 1e6})  # fmt: skip

    print(f"{n:,} events, {WIDTH}x{HEIGHT}, one core, best of {args.repeats}; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; {platform.processor() or platform.machine()}")  # fmt: skip
    print(f"{'kernel':<20}{'evspec Mev/s':>14}{'x naive':>10}{'x tonic':>10}{'of floor':>10}")
    for row in rows:
        vs_naive = f"{row['evspec_Mev_s'] / row['naive_Mev_s']:.0f}x" if row["naive_Mev_s"] else "-"
        vs_tonic = f"{row['evspec_Mev_s'] / row['tonic_Mev_s']:.1f}x" if row["tonic_Mev_s"] else "-"
        of_floor = f"{row['evspec_Mev_s'] / row['floor_Mev_s']:.0%}"
        print(f"{row['kernel']:<20}{row['evspec_Mev_s']:>14.0f}{vs_naive:>10}{vs_tonic:>10}{of_floor:>10}")
    print(json.dumps({"events": n, "copy_GB_s": bandwidth / 1e9, "rows": rows}))


if __name__ == "__main__":
    main()
