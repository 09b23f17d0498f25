"""The engine's projection kernel at 7B shapes, per tile configuration, against cuBLAS, inductor and the copy floor.

    PYTHONPATH=src python benchmarks/matvec.py [--rows 1,2,5,9,17] [--sweep]

For each projection of a 7B LLaMA layer (q/k/v, o with its residual, gate/up, down with the
SiLU product and residual) and each row count (1: a step; k + 1: a verify), times in one
process, as 8 layers' distinct weights replayed as one CUDA graph (so the weights come from
HBM, not L2, and host launch latency does not count):
- `reference`: PyTorch's ops (cuBLAS GEMM, SiLU and add kernels), what runs without the kernel;
- `inductor`: the same ops compiled with the engine's inductor options (coordinate-descent
  tuned Triton reductions; one row only, as the engine compiled them before the kernel);
- `kernel`: `evspec.engine.matvec` with its default tiles (`tiles`), as the engine calls it
  (for several rows the SiLU product is a separate kernel before it, there inductor-fused);
- with `--sweep`, every tile configuration of a grid, printing the best.
Prints weight bytes per microsecond as a fraction of the device-to-device copy bandwidth
(read + write counted) measured in the same run, then one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from evspec.engine import matvec
from evspec.engine.kernels import TUNED_INDUCTOR
from evspec.timing import median_ms

CUDA = [torch.device("cuda")]
SHAPES = {  # name: (out features, in features, silu_pairs, residual)
    "q/k/v": (12288, 4096, False, False),
    "o + residual": (4096, 4096, False, True),
    "gate/up": (22016, 4096, False, False),
    "down(silu) + residual": (4096, 11008, True, True),
}
LAYERS = 8  # distinct weights per timing: 8 x 33.5 MB (the smallest) outgrows an H100's 50 MB L2


def sweep_configs(rows: int) -> list[dict[str, int]]:
    if rows == 1:
        grid = itertools.product([4, 8, 16, 32], [256, 512, 1024], [2, 4, 8], [1])
    else:
        grid = itertools.product([16, 32, 64], [64, 128, 256], [4], [2, 3, 4])
    block_m = 1 if rows == 1 else 16 if rows <= 16 else 32
    return [{"BLOCK_M": block_m, "BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": s} for n, k, w, s in grid]


def kernel(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, silu_pairs: bool,
           config: dict[str, int] | None = None) -> torch.Tensor:
    """The kernel as the engine calls it (`matvec.linear`): the SiLU product of several rows computed before it."""
    if silu_pairs and x.shape[0] > 1:
        gate, up = x.chunk(2, dim=-1)
        x, silu_pairs = torch.nn.functional.silu(gate) * up, False
    return matvec.launch(x, weight, residual, silu_pairs, config)


def graph_us(function, repeats: int) -> float:
    """Median microseconds of one call of `function(layer)`, as LAYERS calls captured in one CUDA graph."""
    for layer in range(LAYERS):  # compile and warm up outside the capture
        function(layer)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(LAYERS):
            function(layer)
    return median_ms(graph.replay, CUDA, repeats) * 1000 / LAYERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2,5,9,17")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="time every tile configuration of the grid")
    args = parser.parse_args()
    torch.manual_seed(0)
    source = torch.empty(2**30, dtype=torch.bfloat16, device="cuda")
    target = torch.empty_like(source)
    bandwidth = 2 * source.nbytes / (median_ms(lambda: target.copy_(source), CUDA, 10) / 1000)  # bytes/s
    del source, target
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    results = []
    for name, (n, k, silu_pairs, with_residual) in SHAPES.items():
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(LAYERS)]
        floor_us = weights[0].nbytes / bandwidth * 1e6
        inductor = torch.compile(matvec.reference, fullgraph=True, options=TUNED_INDUCTOR)
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, 2 * k if silu_pairs else k, device="cuda", dtype=torch.bfloat16)
            residual = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16) if with_residual else None
            expected = matvec.reference(x.float(), weights[0].float(), None if residual is None else residual.float(),
                                        silu_pairs)  # fmt: skip
            error = (kernel(x, weights[0], residual, silu_pairs).float() - expected).abs().max().item()
            row = {"shape": name, "rows": rows, "floor_us": floor_us, "max_abs_error": error}
            row["reference_us"] = graph_us(lambda i: matvec.reference(x, weights[i], residual, silu_pairs), args.repeats)
            if rows == 1:
                torch._dynamo.reset()
                row["inductor_us"] = graph_us(lambda i: inductor(x, weights[i], residual, silu_pairs), args.repeats)
            row["kernel_us"] = graph_us(lambda i: kernel(x, weights[i], residual, silu_pairs), args.repeats)
            if args.sweep:
                timed = []
                for config in sweep_configs(rows):
                    try:
                        us = graph_us(lambda i, c=config: kernel(x, weights[i], residual, silu_pairs, c), 5)
                    except Exception as failure:  # a configuration the compiler rejects (shared memory, registers)
                        print(f"  {config}: {type(failure).__name__}")
                        continue
                    timed.append((us, config))
                timed.sort(key=lambda item: item[0])
                row["best"] = [{"us": us, **config} for us, config in timed[:3]]
            results.append(row)
            line = "  ".join(f"{key[:-3]} {floor_us / row[key]:.2f}" for key in ("reference_us", "inductor_us", "kernel_us")
                             if key in row)  # fmt: skip
            best = row.get("best")
            if best:
                line += f"  best {floor_us / best[0]['us']:.2f} {best[0]}"
            print(f"{name:24s} rows {rows:2d}  floor {floor_us:6.1f} us  x copy bandwidth: {line}  (error {error:.1e})",
                  flush=True)  # fmt: skip
        del weights
    print(json.dumps({"device": torch.cuda.get_device_name(), "bandwidth_tb_s": bandwidth / 1e12, "results": results}))


if __name__ == "__main__":
    main()
