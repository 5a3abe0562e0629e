"""8-bit products against cuBLAS bf16 at one model's linear shapes, each timed after an RMSNorm as CUDA-graph replays
(benchmarks/_kernel_bench.py): up to 16 rows the fp8- and int8-weight GEMV (W8A16, what decode runs); beyond, W8A8
with the rows quantized per token in one kernel pass (kernels/quant_rows.py), then for fp8 torch._scaled_mm
(cuBLASLt, row-wise scales) or the Triton scaled GEMM (kernels/scaled_gemm.py) row-wise and block-wise (128-column
groups, as HF fine-grained checkpoints), for int8 the Triton GEMM or torch._int_mm with the scaling after (the
reference path). The quantization is inside each W8A8 time, as an unfused layer runs it.

    python benchmarks/scaled_gemm_bench.py --model llama3-8b [--rows 1 16 256 4096] [--sweep]
"""

from __future__ import annotations

import argparse
import itertools

import torch

import _kernel_bench as kb
from pagedllm.kernels.gemv import gemv
from pagedllm.kernels.quant_rows import quantize_rows
from pagedllm.kernels.scaled_gemm import scaled_gemm
from pagedllm.quantization import fp8_utils as fq
from pagedllm.quantization.int8 import quantize_per_token_int8

SWEEP = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
         for m, n, w, s in itertools.product((64, 128), (64, 128, 256), (4, 8), (3, 4)) if m * n <= 128 * 256]


def bench_layer(args: argparse.Namespace, k: int, n: int, name: str) -> None:
    dt = torch.bfloat16
    master = torch.randn(n, k, device="cuda") * k**-0.5
    weights = [master.to(dt) for _ in range(kb.copies(2, n, k))]
    wq, sw = fq.quantize_per_channel(master)
    rows_w = [(wq.clone(), sw.reshape(1, n).clone()) for _ in range(kb.copies(1, n, k))]
    bq, grid = fq.quantize_blocks(master, 128, 128)
    block_w = [(bq.clone(), grid.repeat_interleave(128, dim=0)[:n].contiguous()) for _ in range(kb.copies(1, n, k))]
    iq, si = quantize_per_token_int8(master)
    int8_w = [(iq.clone(), si.reshape(1, n).clone()) for _ in range(kb.copies(1, n, k))]
    ref_rows = (wq.float() * sw).to(dt)
    ref_int8 = (iq.float() * si).to(dt)
    ref_blocks = (bq.float() * fq.expand_blocks(grid, 128, 128, (n, k))).to(dt)
    del master

    def runs(rows: int, out: torch.Tensor) -> list[kb.Run]:
        if rows <= 16:
            def w8a16(h: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> None:
                gemv(h, w[0], out=out, weight_scale=w[1])

            return [kb.Run("fp8 gemv w8a16", rows_w, w8a16, ref_rows, 1),
                    kb.Run("int8 gemv w8a16", int8_w, w8a16, ref_int8, 1)]

        def scaled_mm(h: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> None:
            hq, sh = quantize_rows(h)
            out.copy_(torch._scaled_mm(hq, w[0].t(), scale_a=sh, scale_b=w[1], out_dtype=dt))

        def int_mm(h: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> None:
            hq, sh = quantize_rows(h, torch.int8)
            out.copy_((torch._int_mm(hq, w[0].t()).float() * sh * w[1]).to(dt))

        def triton(config: dict[str, int] | None, quant: torch.dtype = torch.float8_e4m3fn, group: int = 0):
            return lambda h, w: scaled_gemm(*quantize_rows(h, quant, group), w[0], w[1], config=config, out=out)

        found = [kb.Run("fp8 scaled_mm rows", rows_w, scaled_mm, ref_rows, 1),
                 kb.Run("fp8 triton rows", rows_w, triton(None), ref_rows, 1),
                 kb.Run("fp8 triton blocks", block_w, triton(None, group=128), ref_blocks, 1),
                 kb.Run("int8 int_mm rows", int8_w, int_mm, ref_int8, 1),
                 kb.Run("int8 triton rows", int8_w, triton(None, torch.int8), ref_int8, 1)]
        if args.sweep:
            found += [kb.Run(f"fp8 triton rows {c}", rows_w, triton(c), ref_rows, 1) for c in SWEEP]
            found += [kb.Run(f"fp8 triton blocks {c}", block_w, triton(c, group=128), ref_blocks, 1) for c in SWEEP]
            found += [kb.Run(f"int8 triton rows {c}", int8_w, triton(c, torch.int8), ref_int8, 1) for c in SWEEP]
        return found

    kb.bench_rows(args, name, n, k, weights, runs)


if __name__ == "__main__":
    kb.main(lambda parser: None, bench_layer)
