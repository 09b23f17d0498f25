"""Batch-1 (and verify-sized) projections as one Triton kernel that streams each weight once.

A decode step is a chain of matrix-vector products: every weight byte is read once for one
token (or for the k + 1 tokens of a verify), so a projection costs its weight's bytes over
the memory bandwidth. cuBLAS's GEMM for 1-32 rows runs well below that, and inductor's tuned
reductions land at 0.76-1.0x the copy bandwidth depending on the tiles its timing-based
search happens to pick (BENCHMARKS.md). This kernel has fixed tiles (`tiles`, chosen by
`benchmarks/matvec.py`), so every compilation runs the same code:

    y[m] = W x[m] (+ residual[m])                       for m < M <= MAX_ROWS
    y[m] = W (silu(gate[m]) * up[m]) (+ residual[m])    with `silu_pairs`: x[m] = [gate | up]

Each program owns BLOCK_N output features and walks K in BLOCK_K chunks: for one row the
products accumulate element-wise in fp32 and are reduced once at the end; for 2-32 rows a
tensor-core dot consumes the same weight tile for every row. The residual add is fused in,
and so, for one row, is the SiLU product (for more rows `linear` computes it first: fused
into the dot's loop it ran at 0.13x the bandwidth).
Arithmetic is transformers' (SiLU in fp32 rounded to the input dtype, product and sum
rounded to it), accumulation in fp32 as cuBLAS does.

`linear` is the one entry point: the kernel on CUDA for bf16/fp16 and at most MAX_ROWS rows,
PyTorch's own ops (the reference the tests hold the kernel to) everywhere else.
"""

from __future__ import annotations

from importlib.util import find_spec

import torch
from torch.nn import functional as F

MAX_ROWS = 32  # a verify of k + 1 <= 32 tokens; longer inputs (prefill) are GEMMs, cuBLAS's domain
AVAILABLE = find_spec("triton") is not None  # CUDA builds of torch ship Triton; CPU builds need none


def reference(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
              silu_pairs: bool = False) -> torch.Tensor:  # fmt: skip
    """The projection in PyTorch's ops, as transformers' LLaMA computes it."""
    if silu_pairs:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    y = F.linear(x, weight)
    return y if residual is None else residual + y


def linear(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None, silu_pairs: bool = False,
           kernel: bool = True) -> torch.Tensor:  # fmt: skip
    """x [..., K] (or [..., 2K] with `silu_pairs`) times weight [N, K]^T, plus `residual` [..., N].

    `kernel=False` (or a tensor the kernel does not take, or one that needs gradients) runs `reference`.
    """
    rows = x.numel() // x.shape[-1]
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)  # the kernel has no backward
    if training or not (kernel and AVAILABLE and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
                        and rows <= MAX_ROWS):  # fmt: skip
        return reference(x, weight, residual, silu_pairs)
    if silu_pairs and rows > 1:  # fused into the tensor-core path it ran at 0.13x the bandwidth: kept outside
        gate, up = x.chunk(2, dim=-1)
        x, silu_pairs = F.silu(gate) * up, False
    flat_residual = None if residual is None else residual.reshape(rows, weight.shape[0])
    y = torch.ops.evspec.matvec(x.reshape(rows, x.shape[-1]), weight, flat_residual, silu_pairs)
    return y.view(*x.shape[:-1], weight.shape[0])


def tiles(rows: int, n: int, k: int) -> dict[str, int]:
    """Tile sizes and launch shape for `rows` x [n, k]: one tiling per path, picked from a grid swept at each
    7B projection on an H100 (benchmarks/matvec.py --sweep; BENCHMARKS.md). Narrow outputs take narrower
    tiles in the tensor-core path, so that 4096 features still make 128 programs for 132 SMs."""
    if rows == 1:
        return {"BLOCK_M": 1, "BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_M": 16 if rows <= 16 else 32, "BLOCK_N": 32 if n <= 4096 else 64, "BLOCK_K": 256,
            "num_warps": 4, "num_stages": 4}  # fmt: skip


if AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _matvec_kernel(x_ptr, w_ptr, residual_ptr, y_ptr, M, N, K, x_row_stride,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SILU_PAIRS: tl.constexpr, RESIDUAL: tl.constexpr):  # fmt: skip
        features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        batch = tl.arange(0, BLOCK_M)
        feature_ok = features < N
        if BLOCK_M == 1:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            columns = start + tl.arange(0, BLOCK_K)
            column_ok = columns < K
            w = tl.load(w_ptr + features[:, None] * K + columns[None, :],
                        mask=feature_ok[:, None] & column_ok[None, :], other=0.0)  # fmt: skip
            x_offsets = batch[:, None] * x_row_stride + columns[None, :]
            x_mask = (batch[:, None] < M) & column_ok[None, :]
            x = tl.load(x_ptr + x_offsets, mask=x_mask, other=0.0)  # [BLOCK_M, BLOCK_K]
            if SILU_PAIRS:
                up = tl.load(x_ptr + x_offsets + K, mask=x_mask, other=0.0)
                gate = x.to(tl.float32)
                x = (gate * tl.sigmoid(gate)).to(up.dtype) * up
            if BLOCK_M == 1:
                acc += w.to(tl.float32) * x.to(tl.float32)
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        if BLOCK_M == 1:
            y = tl.sum(acc, axis=1)[None, :]
        else:
            y = acc
        out_offsets = batch[:, None] * N + features[None, :]
        out_mask = (batch[:, None] < M) & feature_ok[None, :]
        y = y.to(y_ptr.dtype.element_ty)
        if RESIDUAL:
            residual = tl.load(residual_ptr + out_offsets, mask=out_mask, other=0.0)
            y = (y.to(tl.float32) + residual.to(tl.float32)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + out_offsets, y, mask=out_mask)

    def launch(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, silu_pairs: bool,
               config: dict[str, int] | None = None) -> torch.Tensor:  # fmt: skip
        """The kernel on x [M, K or 2K] (contiguous) with `config` (default: `tiles`); benchmarks/matvec.py sweeps it."""
        rows = x.shape[0]
        n, k = weight.shape
        if x.shape[1] != (2 * k if silu_pairs else k) or rows > MAX_ROWS or (silu_pairs and rows > 1):
            raise ValueError(f"matvec: x of shape {tuple(x.shape)} for a weight of {k} columns ({silu_pairs=}; "
                             f"SiLU pairs for one row only)")  # fmt: skip
        y = torch.empty(rows, n, device=x.device, dtype=x.dtype)
        config = config or tiles(rows, n, k)
        with torch.cuda.device(x.device):
            _matvec_kernel[(triton.cdiv(n, config["BLOCK_N"]),)](
                x, weight, y if residual is None else residual, y, rows, n, k, x.shape[1],
                SILU_PAIRS=silu_pairs, RESIDUAL=residual is not None, **config)  # fmt: skip
        return y

    @torch.library.custom_op("evspec::matvec", mutates_args=(), device_types="cuda")
    def _matvec(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, silu_pairs: bool) -> torch.Tensor:
        """The kernel as an op torch.compile treats as opaque (its tiles are fixed, not inductor's to tune)."""
        return launch(x.contiguous(), weight.contiguous(), None if residual is None else residual.contiguous(), silu_pairs)

    @_matvec.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, silu_pairs: bool) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])
