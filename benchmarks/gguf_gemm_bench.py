"""GGUF-block products (pagedllm.kernels.gguf_gemm: the GEMV up to 16 rows, the GEMM beyond) against cuBLAS bf16
`F.linear` at one model's linear shapes, for Q4_K, Q6_K and Q8_0 (--types) weights of random valid blocks and bf16
rows. As in int_gemm_bench.py, each product is timed after an RMSNorm (the GEMV overlaps the kernel before it through
programmatic dependent launch), as CUDA-graph replays over enough weight copies that each reads its weight from
memory, not L2, and each kernel is checked against the float32 product with its dequantized weight before it is timed.
One JSON line per (layer, rows, kernel/tile).

    python benchmarks/gguf_gemm_bench.py --model llama3-8b --rows 1 16 256 4096 [--types Q4_K Q6_K Q8_0] [--sweep]

--sweep: every tile of SWEEPS too. weight_TBps counts the blocks' bytes (Q4_K 4.5 bits a weight, Q6_K 6.5625, Q8_0 8.5).
The fused layers run here as one buffer of one type; a Q4_K_M model splits q/k/v (or gate/up) into parts by type.
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial

import torch

import _kernel_bench as kb
from pagedllm.kernels.gguf_gemm import GEMV_ROWS, gguf_gemm, gguf_gemm_config, gguf_gemv, gguf_gemv_config
from pagedllm.quantization import gguf as g

# GEMV: (BLOCK_N, BLOCK_K, num_warps, num_stages, splits); GEMM: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages,
# splits). BLOCK_K is rounded down to whole blocks (256 for K-quants).
SWEEPS = {
    "gemv 1": [c for c in itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8), (3, 4), (1, 2, 4))
               if c[0] * c[1] <= 16384],
    "gemv 16": list(itertools.product((16, 32, 64), (256, 512), (4, 8), (3,), (1, 2, 4))),
    "gemm 64": list(itertools.product((0,), (32, 64, 128), (256, 512), (4, 8), (3, 4), (1, 2, 4))),
    "gemm big": list(itertools.product((64, 128), (64, 128), (256,), (4, 8), (2, 3), (1,))),
}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--types", nargs="+", default=["Q4_K", "Q6_K", "Q8_0"], choices=list(g.NAMES.values()))


def bench_layer(args: argparse.Namespace, k: int, n: int, name: str) -> None:
    """Every row count and kernel of one [n, k] layer (its weights freed on return)."""
    dt = torch.bfloat16
    by_name = {v: t for t, v in g.NAMES.items()}
    weights = [torch.randn(n, k, device="cuda", dtype=dt) * k**-0.5 for _ in range(kb.copies(2, n, k))]
    blocks = {}  # type -> (raw copies, the dequantized bf16 weight for the reference, bytes per weight)
    for type_name in args.types:
        qtype = by_name[type_name]
        raw = g.random_blocks(qtype, n, k, torch.Generator(device="cuda").manual_seed(qtype), "cuda")
        per_weight = g.BLOCKS[qtype][1] / g.BLOCKS[qtype][0]
        blocks[qtype] = ([raw.clone() for _ in range(kb.copies(per_weight, n, k))], g.dequantize(raw, qtype, k).to(dt),
                         per_weight)

    def runs(rows: int, out: torch.Tensor) -> list[kb.Run]:
        kernel, config, product = ("gemv", gguf_gemv_config, gguf_gemv) if rows <= GEMV_ROWS else \
            ("gemm", gguf_gemm_config, gguf_gemm)
        found = []
        for qtype, (raws, ref_w, w_bytes) in blocks.items():
            tiles = [(f"{g.NAMES[qtype]} {kernel}", config(rows, n, k, qtype))]
            if args.sweep:
                tiles += [(f"{g.NAMES[qtype]} {kernel} {c}", c) for c in kb.sweep_configs(SWEEPS, rows, GEMV_ROWS)]
            found += [kb.Run(label, raws, partial(product, qtype=qtype, out=out, config=tile), ref_w, w_bytes)
                      for label, tile in tiles]
        return found

    kb.bench_rows(args, name, n, k, weights, runs)


if __name__ == "__main__":
    kb.main(add_args, bench_layer)
