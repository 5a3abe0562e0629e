"""Integer-weight products (pagedllm.kernels.int_gemm: the GEMV up to 16 rows, the GEMM beyond) against cuBLAS at
one model's linear shapes: W4A16 and W8A16 (bf16 rows, groups of --group-size) vs bf16 `F.linear`, and W8A8 through
torch._int_mm (int8 rows quantized per token, per-row weight scales; its time includes the rows' quantization and the
scaling after, as a W8A8 layer runs it; _int_mm needs over 16 rows, so fewer are padded to 32). Each product is
timed after an RMSNorm, as in gemv_bench.py (the GEMV overlaps the kernel before it through programmatic dependent
launch), as CUDA-graph replays over enough weight copies that each reads its weight from memory, not L2. Every
kernel is checked against the float32 product with its dequantized weight before it is timed. One JSON line per
(layer, rows, kernel/tile).

    python benchmarks/int_gemm_bench.py --model llama3-8b --rows 1 16 256 4096 [--bits 4 8] [--sweep]

--sweep: every tile of SWEEPS for the integer kernels too (the GEMV's for up to 16 rows, the GEMM's beyond).
weight_TBps counts the packed codes only (0.5 or 1 byte per weight; scales and zeros add 3 bytes per group).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F

import _kernel_bench as kb
from pagedllm.kernels.gemv import gemv, int_gemv_config
from pagedllm.kernels.int_gemm import GEMV_ROWS, int_gemm, int_gemm_config
from pagedllm.quantization import int_utils as iu

# GEMV: (BLOCK_N, BLOCK_K, num_warps, num_stages, splits) for one row and for 2-16; GEMM: (BLOCK_M, BLOCK_N,
# BLOCK_K, num_warps, num_stages, splits) for decode-sized (up to 64 rows, BLOCK_M set by the rows) and larger batches
SWEEPS = {
    "gemv 1": [c for c in itertools.product((8, 16, 32), (256, 512, 1024), (4, 8), (4,), (1, 2))
               if c[0] * c[1] <= 16384],
    "gemv 16": list(itertools.product((32, 64), (128, 256), (4,), (3, 4), (1, 2, 4))),
    "gemm 64": list(itertools.product((0,), (32, 64, 128), (64, 128), (4,), (3, 4), (1, 2, 4))),
    "gemm big": list(itertools.product((64, 128), (128, 256), (64, 128), (4, 8), (3, 4), (1,))),
}


def int8_per_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and float32 scales [rows] of a float matrix, symmetric per row."""
    scale = (w.abs().amax(-1).float() / 127).clamp(min=1e-10)
    return (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def w8a8(x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor, out: torch.Tensor) -> None:
    """Per-token int8 rows (padded past 16 for _int_mm), the int32 product, both scales applied after."""
    xq, xs = int8_per_row(x)
    if xq.shape[0] <= 16:
        xq = F.pad(xq, (0, 0, 0, 32 - xq.shape[0]))
    acc = torch._int_mm(xq, w_t)[: x.shape[0]]
    out.copy_(acc.float() * xs[:, None] * w_scale[None, :])


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--no-w8a8", action="store_true", help="skip torch._int_mm")


def bench_layer(args: argparse.Namespace, k: int, n: int, name: str) -> None:
    """Every row count and kernel of one [n, k] layer (its weights freed on return)."""
    dt = torch.bfloat16
    master = torch.randn(n, k, device="cuda") * k**-0.5
    weights = [master.to(dt) for _ in range(kb.copies(2, n, k))]
    ints = {}  # bits -> (IntWeight copies, the dequantized bf16 weight for the reference)
    for bits in args.bits:
        codes, scales, zeros = iu.quantize(master, bits, args.group_size, symmetric=False)
        one = iu.IntWeight(iu.pack(codes, bits), scales.to(dt), zeros, bits, args.group_size, k)
        del codes
        ints[bits] = ([iu.IntWeight(one.packed.clone(), one.scales.clone(), one.zeros.clone(), bits, args.group_size,
                                    k) for _ in range(kb.copies(bits / 8, n, k))], one.dequantize(dt))
    if not args.no_w8a8:
        q8, s8 = int8_per_row(master)
        # [K, N] column-major: cuBLASLt's TN
        int8 = [(q8.clone().t(), s8.clone()) for _ in range(kb.copies(1, n, k))]
        int8_ref = (q8.float() * s8[:, None]).to(dt)
        del q8
    del master

    def runs(rows: int, out: torch.Tensor) -> list[kb.Run]:
        kernel = "gemv" if rows <= GEMV_ROWS else "gemm"
        found = []
        for bits in args.bits:
            default = (int_gemv_config if rows <= GEMV_ROWS else int_gemm_config)(rows, n, k, bits, args.group_size)
            tiles = [(f"w{bits}a16 {kernel}", default)]
            if args.sweep:
                tiles += [(f"w{bits}a16 {kernel} {c}", c) for c in kb.sweep_configs(SWEEPS, rows, GEMV_ROWS)]
            found += [kb.Run(label, ints[bits][0], product(rows, tile, out), ints[bits][1], bits / 8)
                      for label, tile in tiles]
        if not args.no_w8a8:
            found.append(kb.Run("w8a8 int_mm", int8, lambda h, w: w8a8(h, *w, out), int8_ref, 1))
        return found

    kb.bench_rows(args, name, n, k, weights, runs)


def product(rows: int, tile: tuple[int, ...], out: torch.Tensor) -> Callable[[torch.Tensor, iu.IntWeight], None]:
    """The integer kernel of `rows` rows (the GEMV up to GEMV_ROWS, the GEMM beyond) with `tile`, into `out`."""
    if rows <= GEMV_ROWS:
        return lambda h, w: gemv(h, w.packed, out=out, config=tile,
                                 int_weight=(w.scales, w.zeros, w.bits, w.group_size))
    return lambda h, w: int_gemm(h, w.packed, w.scales, w.zeros, w.bits, w.group_size, out=out, config=tile)


if __name__ == "__main__":
    kb.main(add_args, bench_layer)
