"""ESIM-style event simulation: a contrast-threshold model driven by internal frames.

Per pixel the sensor keeps a reference log intensity. When the log intensity moves
`pos_thres` above (or `neg_thres` below) the reference, an ON (OFF) event fires and
the reference steps by one threshold; several crossings inside one internal frame
interval fire several events, their times interpolated linearly between the two
frames (ESIM, Rebecq et al. 2018). Thresholds vary per pixel (`sigma_thres`), a pixel
that just fired stays silent for `refractory_period_s` (its reference still steps,
so the change is not lost), and `shot_noise_rate_hz` adds uniform background
events. Parameter names follow v2e where v2e has one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from evspec.events.types import Events

LOG_EPS = 1e-3  # keeps log() finite on black pixels


@dataclass(frozen=True)
class SensorParams:
    pos_thres: float = 0.2
    neg_thres: float = 0.2
    sigma_thres: float = 0.03
    refractory_period_s: float = 0.0005
    shot_noise_rate_hz: float = 0.2


class EventSimulator:
    """Feed luminance frames in time order with `step`; `events()` returns what fired."""

    def __init__(self, first_luminance: np.ndarray, params: SensorParams, rng: np.random.Generator) -> None:
        shape = first_luminance.shape
        self.params = params
        self.rng = rng
        self.pos_thres = np.maximum(rng.normal(params.pos_thres, params.sigma_thres, shape), 0.01).astype(np.float32)
        self.neg_thres = np.maximum(rng.normal(params.neg_thres, params.sigma_thres, shape), 0.01).astype(np.float32)
        self.reference = np.log(first_luminance + LOG_EPS).astype(np.float32)
        self.previous = self.reference.copy()
        self.last_fired_us = np.full(shape, np.iinfo(np.int64).min // 2, dtype=np.int64)
        self.refractory_us = int(round(params.refractory_period_s * 1e6))
        self._buffers = [np.empty(1 << 16, dtype) for dtype in (np.uint16, np.uint16, np.int64, np.uint8)]
        self._count = 0
        self._t_first_us: int | None = None
        self._t_last_us = 0

    def step(self, luminance: np.ndarray, t_previous_us: int, t_current_us: int) -> None:
        """Advance from the last frame (at t_previous_us) to `luminance` at t_current_us."""
        if self._t_first_us is None:
            self._t_first_us = t_previous_us
        current = np.log(luminance + LOG_EPS).astype(np.float32)
        while True:
            x, y, t, p = self._buffers
            written = _fire(
                self.previous, current, self.reference, self.pos_thres, self.neg_thres,
                self.last_fired_us, self.refractory_us, t_previous_us, t_current_us,
                x, y, t, p, self._count,
            )  # fmt: skip
            if written >= 0:
                self._count = written
                break
            self._buffers = [np.concatenate([b, np.empty_like(b)]) for b in self._buffers]
        self.previous = current
        self._t_last_us = t_current_us

    def events(self) -> Events:
        """All events so far plus shot noise, sorted by time (stable: ties keep firing order)."""
        x, y, t, p = (b[: self._count] for b in self._buffers)
        noise = self._shot_noise()
        x, y, t, p = (np.concatenate([a, b]) for a, b in zip((x, y, t, p), noise, strict=True))
        order = np.argsort(t, kind="stable")
        return Events.from_arrays(x[order], y[order], t[order], p[order])

    def _shot_noise(self) -> tuple[np.ndarray, ...]:
        height, width = self.reference.shape
        if self._t_first_us is None or self.params.shot_noise_rate_hz <= 0:
            return (np.zeros(0, np.uint16), np.zeros(0, np.uint16), np.zeros(0, np.int64), np.zeros(0, np.uint8))
        span_us = self._t_last_us - self._t_first_us
        n = int(self.rng.poisson(self.params.shot_noise_rate_hz * height * width * span_us * 1e-6))
        return (
            self.rng.integers(0, width, n).astype(np.uint16),
            self.rng.integers(0, height, n).astype(np.uint16),
            self.rng.integers(self._t_first_us, self._t_last_us, n, endpoint=True).astype(np.int64),
            self.rng.integers(0, 2, n).astype(np.uint8),
        )


@numba.njit(cache=True, nogil=True)
def _fire(previous, current, reference, pos_thres, neg_thres, last_fired_us, refractory_us,
          t0_us, t1_us, out_x, out_y, out_t, out_p, count):  # fmt: skip
    """Fire the events of one interval into out_* from index `count`.

    Returns the new count, or -1 (touching no state) if the buffers could be too small.
    """
    height, width = current.shape
    # 1. Upper bound on the events this interval can write (refractory only removes).
    needed = 0
    for row in range(height):
        for col in range(width):
            change = current[row, col] - reference[row, col]
            if change > 0:
                needed += int(change / pos_thres[row, col])
            else:
                needed += int(-change / neg_thres[row, col])
    if count + needed > out_t.shape[0]:
        return -1
    # 2. Crossings: level L_ref + k*thres is reached at the fraction of the interval where
    #    the linear path previous -> current meets it.
    span_us = t1_us - t0_us
    for row in range(height):
        for col in range(width):
            start, end = previous[row, col], current[row, col]
            change = end - reference[row, col]
            if change > 0:
                threshold, polarity, n = pos_thres[row, col], 1, int(change / pos_thres[row, col])
            else:
                threshold, polarity, n = -neg_thres[row, col], 0, int(-change / neg_thres[row, col])
            for k in range(1, n + 1):
                level = reference[row, col] + k * threshold
                fraction = (level - start) / (end - start) if end != start else 1.0
                fraction = min(max(fraction, 0.0), 1.0)
                t_us = t0_us + int(round(fraction * span_us))
                if t_us - last_fired_us[row, col] >= refractory_us:
                    out_x[count], out_y[count], out_t[count], out_p[count] = col, row, t_us, polarity
                    last_fired_us[row, col] = t_us
                    count += 1
            reference[row, col] += n * threshold
    return count
