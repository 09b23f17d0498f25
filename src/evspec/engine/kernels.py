"""What both engines share: attention over the filled part of a static cache, and CUDA-graph capture.

**Cost follows the filled length, not the capacity.** A step attends only to the cache's
first `bucket_end(length)` positions (the length rounded up to a multiple of `BUCKET`), so
a cache of 8192 positions holding 2300 costs what one of 2304 does; the few unfilled
positions inside the bucket are masked. Graphs are captured per (step length, bucket), so
a graph never reads more than one bucket past the filled length.

**Attention kernels for steps** (`attend`; the engine picks one for one-token steps and one
for verifies, by measurement, see BENCHMARKS.md): `fused` is PyTorch's fused SDPA with the
mask as an additive bias built once per step (cuDNN's on an H100); `matmul` computes the scores as one batched matmul, the softmax
in fp32 (as transformers' eager attention does) and probabilities x values as a second
batched matmul, letting cuBLAS split the long key dimension (inductor compiles it into its own
kernels; `fused` is an op it does not trace into, so the library kernel runs). Both read the cache in place;
the prefill uses the fused causal kernel. (Split-KV kernels, chunked matmuls and a Triton
flash-decoding kernel, were measured slower than cuDNN's for one query: BENCHMARKS.md.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

BUCKET = 256  # positions: the granularity at which step cost follows the filled length

# inductor's coordinate-descent tuning (gpt-fast's setting): it turns a batch-1 matrix-vector product into a
# Triton reduction and tunes its tiles by timing them. The engines do not use it: their projections are
# `evspec.engine.matvec`'s fixed-tile kernel (tuning by measurement moved a 7B step by up to 0.9 ms between
# compilations), and tuning what is left (norms, RoPE) took minutes of compilation per shape for nothing
# measurable. The benchmarks compile with it as the peer to compare against (BENCHMARKS.md).
TUNED_INDUCTOR = {"coordinate_descent_tuning": True}


def bucket_end(length: int, capacity: int) -> int:
    """The attended prefix for a step whose last position is `length - 1`: a multiple of BUCKET, within capacity."""
    return min(-(-length // BUCKET) * BUCKET, capacity)


def round_capacity(length: int) -> int:
    """Static caches are allocated in whole buckets, so every bucket_end splits into whole chunks."""
    return -(-length // BUCKET) * BUCKET


ATTENTION = ("fused", "matmul")


def compile_per_shape(function: Callable, options: dict | None, dynamic: bool | None = None) -> Callable:
    """`function` under torch.compile (whole graph), with room for a compilation per step length and length
    bucket: an engine serving long answers meets many (dynamo's default limit of 8 is a hard failure under
    `fullgraph`)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(function, fullgraph=True, dynamic=dynamic, options=options)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask [n, L] as the additive bias attention takes (0 where visible, -inf elsewhere).

    Built once per step and shared by every layer: given a boolean mask, SDPA converts it to this
    form on every call (three kernels per layer, 0.2 ms of a 7B step, BENCHMARKS.md).
    """
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, kernel: str) -> torch.Tensor:
    """q [1, Hq, n, d] over keys/values [1, Hkv, L, d] with `bias` [n, L] (`additive_mask`); -> [1, Hq, n, d].

    Heads are grouped as transformers' `repeat_kv` groups them (query head h reads kv head h // (Hq / Hkv)).
    Every query must see at least one key.
    """
    if kernel == "fused":
        return torch.ops.evspec.fused_attention(q, keys, values, bias)
    _, n_heads, n, head_dim = q.shape
    n_kv_heads, length = keys.shape[1], keys.shape[2]
    group = n_heads // n_kv_heads
    rows = q.reshape(1, n_kv_heads, group * n, head_dim)  # the queries that read one kv head, stacked
    scores = torch.matmul(rows, keys.transpose(-1, -2)).float() * head_dim**-0.5  # [1, Hkv, g*n, L]
    scores = (scores.view(1, n_kv_heads, group, n, length) + bias).view(1, n_kv_heads, group * n, length)
    probs = scores.softmax(-1).to(values.dtype)
    return torch.matmul(probs, values).view(1, n_heads, n, head_dim)


@torch.library.custom_op("evspec::fused_attention", mutates_args=())
def fused_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused SDPA (cuDNN's kernel on an H100) as an op torch.compile does not trace into: the
    library kernel runs whatever inductor's lowering of SDPA would choose, and a profile names it."""
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, enable_gqa=q.shape[1] != keys.shape[1])
    return out.contiguous()  # the layout the fake below promises


@fused_attention.register_fake
def _(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)


class Graphs:
    """CUDA graphs of one engine, captured on first use per key and replayed after.

    All graphs share one memory pool, so outputs of one replay may be overwritten by the next
    replay of any graph of the engine: callers read (or clone) outputs before the next step.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = device.type == "cuda"
        if self.enabled:
            with torch.cuda.device(device):
                self.pool = torch.cuda.graph_pool_handle()
                # a capture stream on this engine's GPU: torch.cuda.graph's default one is made once per
                # process on whichever GPU was current, so a draft on a second GPU would be captured from a
                # stream of the first and its kernels would land on an uncaptured stream (capture error)
                self.capture_stream = torch.cuda.Stream()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, object]] = {}

    def run(self, key: tuple, function: Callable[[], object], restore: Callable[[], None]) -> object:
        """`function()` (reading static inputs the caller filled), as a replayed graph on CUDA.

        `restore` puts back the engine state the function advances (write positions), so the
        warm-up and capture runs leave no trace but the garbage past the filled length.
        """
        if not self.enabled:
            return function()
        with torch.cuda.device(self.device):  # streams and capture on the engine's GPU (the draft may have its own)
            return self._replay(key, function, restore)

    def _replay(self, key: tuple, function: Callable[[], object], restore: Callable[[], None]) -> object:
        if key not in self.graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up (compilation, cuBLAS workspaces) off the capture
                for _ in range(2):
                    function()
                    restore()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.capture_stream):
                out = function()
            restore()  # capture records the kernels without running them
            self.graphs[key] = (graph, out)
        graph, out = self.graphs[key]
        graph.replay()
        return out


def host_to_device(values: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Ids from the host without a host synchronisation (pinned memory, non-blocking copy) on CUDA."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
