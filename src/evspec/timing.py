"""One timer for every measurement: a stopwatch for phases of one run, repeats for unit costs.

GPU work is asynchronous, so a time is read only after the devices that did the work
have finished it: `Stopwatch` synchronises their current streams before it starts and
before each reading (a reading may name the devices whose work it waits for).
`measure_ms` times repeats of a function after warm-up calls (graph capture, compilation,
allocator growth excluded): with CUDA events on the current stream when one GPU does the
work (no host overhead between kernels is hidden or added), else with the stopwatch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import torch


class Stopwatch:
    """Milliseconds since construction (or `restart`), read after synchronising the devices."""

    def __init__(self, devices: Iterable[torch.device | str]) -> None:
        self.devices = {torch.device(d) for d in devices if torch.device(d).type == "cuda"}
        self.restart()

    def _sync(self, devices) -> None:
        for device in devices:  # the current stream's work: a side stream's may go on (`prefill` drafting)
            torch.cuda.current_stream(device).synchronize()

    def restart(self) -> None:
        self._sync(self.devices)
        self.started = time.perf_counter()

    def ms(self, *only: torch.device) -> float:
        """Milliseconds until the work queued so far on the devices' current streams (`only` these devices) is done."""
        self._sync(self.devices if not only else {d for d in only if d.type == "cuda"})
        return (time.perf_counter() - self.started) * 1000


def measure_ms(function: Callable[[], object], devices: Iterable[torch.device | str], repeats: int,
               warmup: int = 1) -> list[float]:  # fmt: skip
    """Milliseconds of each of `repeats` calls of `function` after `warmup` untimed calls."""
    devices = {torch.device(d) for d in devices}
    for _ in range(warmup):
        function()
    cuda = [d for d in devices if d.type == "cuda"]
    times = []
    if len(devices) == 1 and cuda:
        with torch.cuda.device(cuda[0]):
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                function()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        return times
    clock = Stopwatch(devices)
    for _ in range(repeats):
        clock.restart()
        function()
        times.append(clock.ms())
    return times


def median_ms(function: Callable[[], object], devices: Iterable[torch.device | str], repeats: int,
              warmup: int = 1) -> float:  # fmt: skip
    return statistics.median(measure_ms(function, devices, repeats, warmup))
