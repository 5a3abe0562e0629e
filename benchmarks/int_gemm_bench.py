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
import json

import torch
import torch.nn.functional as F

from gemm_bench import layer_shapes, time_graph
from pagedllm.kernels.gemv import gemv, int_gemv_config
from pagedllm.kernels.int_gemm import GEMV_ROWS, int_gemm, int_gemm_config
from pagedllm.kernels.norm import rms_norm
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


def sweep_configs(rows: int) -> list[tuple[int, ...]]:
    if rows == 1:
        return SWEEPS["gemv 1"]
    if rows <= GEMV_ROWS:
        return SWEEPS["gemv 16"]
    if rows <= 64:
        bm = max(16, 1 << (rows - 1).bit_length())
        return [(bm, *c[1:]) for c in SWEEPS["gemm 64"]]
    return SWEEPS["gemm big"]


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 256, 1024, 4096])
    parser.add_argument("--layers", nargs="+", default=["qkv", "o", "gate_up", "down"])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--no-w8a8", action="store_true", help="skip torch._int_mm")
    parser.add_argument("--sweep", action="store_true", help="time every tile of the SWEEPS lists too")
    args = parser.parse_args()
    from transformers import AutoConfig

    from pagedllm.benchmarks.workloads import shape_dir

    config = AutoConfig.from_pretrained(shape_dir(args.model))
    for name in args.layers:
        bench_layer(args, *layer_shapes(config)[name], name)


def bench_layer(args: argparse.Namespace, k: int, n: int, name: str) -> None:
    """Every row count and kernel of one [n, k] layer (its weights freed on return)."""
    dt = torch.bfloat16

    def copies(bytes_per_weight: float) -> int:  # > 400 MB of weights per replay: several times the L2
        return max(2, -(-400_000_000 // int(bytes_per_weight * n * k)))

    master = torch.randn(n, k, device="cuda") * k**-0.5
    weights = [master.to(dt) for _ in range(copies(2))]
    ints = {}  # bits -> (IntWeight copies, the dequantized bf16 weight for the reference)
    for bits in args.bits:
        codes, scales, zeros = iu.quantize(master, bits, args.group_size, symmetric=False)
        one = iu.IntWeight(iu.pack(codes, bits), scales.to(dt), zeros, bits, args.group_size, k)
        del codes
        ints[bits] = ([iu.IntWeight(one.packed.clone(), one.scales.clone(), one.zeros.clone(), bits,
                                    args.group_size, k) for _ in range(copies(bits / 8))], one.dequantize(dt))
    if not args.no_w8a8:
        q8, s8 = int8_per_row(master)
        int8 = [(q8.clone().t(), s8.clone()) for _ in range(copies(1))]  # [K, N] column-major: cuBLASLt's TN
        int8_ref = (q8.float() * s8[:, None]).to(dt)
        del q8
    del master
    norm_w = torch.ones(k, device="cuda", dtype=dt)
    for rows in args.rows:
        x = torch.randn(rows, k, device="cuda", dtype=dt)
        out = torch.empty(rows, n, device="cuda", dtype=dt)
        norm_us = time_graph(lambda: rms_norm(x, norm_w, 1e-6), iters=4, seconds=0.2) * 1e6
        h = rms_norm(x, norm_w, 1e-6).float()
        kernel = "gemv" if rows <= GEMV_ROWS else "gemm"
        runs = [("cublas bf16", None, None)]
        for bits in args.bits:
            default = (int_gemv_config if rows <= GEMV_ROWS else int_gemm_config)(rows, n, k, bits, args.group_size)
            runs.append((f"w{bits}a16 {kernel}", bits, default))
            if args.sweep:
                runs += [(f"w{bits}a16 {kernel} {c}", bits, c) for c in sweep_configs(rows)]
        if not args.no_w8a8:
            runs.append(("w8a8 int_mm", "int8", None))
        for label, kind, tile in runs:
            if kind is None:
                ref_w, w_bytes = weights[-1], 2

                def step() -> None:
                    for w in weights:
                        F.linear(rms_norm(x, norm_w, 1e-6), w, out=out)
            elif kind == "int8":
                ref_w, w_bytes = int8_ref, 1

                def step() -> None:
                    for w_t, s in int8:
                        w8a8(rms_norm(x, norm_w, 1e-6), w_t, s, out)
            else:
                ws, ref_w = ints[kind]
                w_bytes = kind / 8

                def step(ws=ws, tile=tile) -> None:
                    for w in ws:
                        hh = rms_norm(x, norm_w, 1e-6)
                        if rows <= GEMV_ROWS:
                            gemv(hh, w.packed, out=out, config=tile,
                                 int_weight=(w.scales, w.zeros, w.bits, w.group_size))
                        else:
                            int_gemm(hh, w.packed, w.scales, w.zeros, w.bits, w.group_size, out=out, config=tile)
            n_copies = len(weights) if kind is None else len(int8) if kind == "int8" else len(ints[kind][0])
            try:
                step()  # the last copy's product, checked before it is timed
                torch.cuda.synchronize()
                ref = h @ ref_w.float().T
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                if not err < 2e-2:
                    raise RuntimeError(f"wrong result: relative error {err:.3g}")
                us = time_graph(step, iters=1, seconds=0.1) / n_copies * 1e6
            except Exception as exc:  # a tile too large for shared memory, say
                print(json.dumps({"model": args.model, "layer": name, "rows": rows, "kernel": label,
                                  "error": str(exc)[:160]}), flush=True)
                continue
            lin = max(us - norm_us, 1e-3)
            print(json.dumps({"model": args.model, "layer": name, "rows": rows, "kernel": label, "n": n, "k": k,
                              "norm_plus_linear_us": round(us, 2), "linear_us": round(lin, 2),
                              "TFLOPs": round(2 * rows * n * k / lin / 1e6, 1),
                              "weight_TBps": round(w_bytes * n * k / lin / 1e6, 2), "rel_err": round(err, 5)}),
                  flush=True)


if __name__ == "__main__":
    main()
