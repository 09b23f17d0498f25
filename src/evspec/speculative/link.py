"""Edge-cloud drafting: the draft on an edge device beside the event camera, the target in the cloud, and a
network link between them whose delays are injected for real (the process sleeps), so what runs meanwhile is
hidden as it would be on two machines.

A message of n bytes sent at time t arrives at t + rtt / 2 + 8 n / bandwidth. The clock of a run starts when
the cloud holds the clip's frames and question and the edge its events and the question, and stops when the edge
holds the whole answer. What crosses the link in between (`evspec.speculative.methods`):

    target   the answer's tokens, streamed down as they come: the last arrives one trip after it was made;
    token    EventGPT on the edge: the first token down, then every cycle the drafts up (their ids and, when
             sampling, the laws q they were drawn from, which the verify reads) and the kept tokens down, one
             round trip per cycle; the edge drafts ahead while they are away (`EdgeTokenDrafter`);
    feature  EventGPT's tower and projector on the edge, the event tokens up once; the draft head beside the
             target (it reads the target's states every cycle, which would cost a round trip each), the
             answer streamed down as the target's.

On one device the edge's and the cloud's compute take turns, so drafting ahead overlaps only the link's
delays; with the draft on its own GPU (`draft_device`) it overlaps the verify too.
"""

from __future__ import annotations

import time

import torch

from evspec.speculative.names import LINK_COUNTS

TOKEN_BYTES = 4  # a token id on the wire (int32)
_SPIN_S = 2e-4  # the last 0.2 ms of a wait is spun: sleep alone overshoots by about a tenth of a millisecond


def tensor_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


class Link:
    """The simulated link of one run: its delays, and per answer the messages and bytes each way (`counts`)."""

    def __init__(self, rtt_ms: float, bandwidth_mbit_s: float) -> None:
        if rtt_ms < 0 or bandwidth_mbit_s <= 0:
            raise ValueError(f"a link needs rtt_ms >= 0 ({rtt_ms}) and bandwidth_mbit_s > 0 ({bandwidth_mbit_s})")
        self.rtt_ms, self.bandwidth_mbit_s = rtt_ms, bandwidth_mbit_s
        self.reset()

    def reset(self) -> None:
        """A new answer: the counts start from zero."""
        self.counts = dict.fromkeys(LINK_COUNTS, 0)

    def one_way_ms(self, n_bytes: int) -> float:
        """How long a message of `n_bytes` takes from one end to the other."""
        return self.rtt_ms / 2 + n_bytes * 8 / (self.bandwidth_mbit_s * 1e3)

    def send(self, n_bytes: int, up: bool, ready: torch.Tensor | None = None) -> float:
        """Send a message now (`up`: edge to cloud); its arrival time (`time.perf_counter`). A message leaves once
        its contents exist: with `ready` on a GPU, once the work queued before it is done."""
        if ready is not None and ready.device.type == "cuda":
            torch.cuda.current_stream(ready.device).synchronize()
        direction = "up" if up else "down"
        self.counts[f"link_messages_{direction}"] += 1
        self.counts[f"link_bytes_{direction}"] += n_bytes
        return time.perf_counter() + self.one_way_ms(n_bytes) / 1e3

    @staticmethod
    def wait_until(arrival: float) -> None:
        """Block until a message has arrived (at once if it already has)."""
        remaining = arrival - time.perf_counter()
        if remaining > _SPIN_S:
            time.sleep(remaining - _SPIN_S)
        while time.perf_counter() < arrival:
            pass
