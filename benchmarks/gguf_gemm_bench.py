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
import json

import torch
import torch.nn.functional as F

from gemm_bench import layer_shapes, time_graph
from pagedllm.kernels.gguf_gemm import GEMV_ROWS, gguf_gemm, gguf_gemm_config, gguf_gemv, gguf_gemv_config
from pagedllm.kernels.norm import rms_norm
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


def sweep_configs(rows: int) -> list[tuple[int, ...]]:
    if rows == 1:
        return SWEEPS["gemv 1"]
    if rows <= GEMV_ROWS:
        return SWEEPS["gemv 16"]
    if rows <= 64:
        bm = max(16, 1 << (rows - 1).bit_length())
        return [(bm, *c[1:]) for c in SWEEPS["gemm 64"]]
    return SWEEPS["gemm big"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 256, 1024, 4096])
    parser.add_argument("--layers", nargs="+", default=["qkv", "o", "gate_up", "down"])
    parser.add_argument("--types", nargs="+", default=["Q4_K", "Q6_K", "Q8_0"], choices=list(g.NAMES.values()))
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
    by_name = {v: t for t, v in g.NAMES.items()}

    def copies(bytes_per_weight: float) -> int:  # > 400 MB of weights per replay: several times the L2
        return max(2, -(-400_000_000 // int(bytes_per_weight * n * k)))

    weights = [torch.randn(n, k, device="cuda", dtype=dt) * k**-0.5 for _ in range(copies(2))]
    blocks = {}  # type -> (raw copies, the dequantized bf16 weight for the reference, bytes per weight)
    for type_name in args.types:
        qtype = by_name[type_name]
        raw = g.random_blocks(qtype, n, k, torch.Generator(device="cuda").manual_seed(qtype), "cuda")
        per_weight = g.BLOCKS[qtype][1] / g.BLOCKS[qtype][0]
        blocks[qtype] = ([raw.clone() for _ in range(copies(per_weight))], g.dequantize(raw, qtype, k).to(dt),
                         per_weight)
    norm_w = torch.ones(k, device="cuda", dtype=dt)
    for rows in args.rows:
        x = torch.randn(rows, k, device="cuda", dtype=dt)
        out = torch.empty(rows, n, device="cuda", dtype=dt)
        norm_us = time_graph(lambda: rms_norm(x, norm_w, 1e-6), iters=4, seconds=0.2) * 1e6
        h = rms_norm(x, norm_w, 1e-6).float()
        kernel = "gemv" if rows <= GEMV_ROWS else "gemm"
        runs: list[tuple[str, int | None, tuple | None]] = [("cublas bf16", None, None)]
        for qtype in blocks:
            default = (gguf_gemv_config if rows <= GEMV_ROWS else gguf_gemm_config)(rows, n, k, qtype)
            runs.append((f"{g.NAMES[qtype]} {kernel}", qtype, default))
            if args.sweep:
                runs += [(f"{g.NAMES[qtype]} {kernel} {c}", qtype, c) for c in sweep_configs(rows)]
        for label, qtype, tile in runs:
            if qtype is None:
                ref_w, w_bytes, n_copies = weights[-1], 2.0, len(weights)

                def step() -> None:
                    for w in weights:
                        F.linear(rms_norm(x, norm_w, 1e-6), w, out=out)
            else:
                raws, ref_w, w_bytes = blocks[qtype]
                n_copies = len(raws)

                def step(raws=raws, qtype=qtype, tile=tile) -> None:
                    for raw in raws:
                        hh = rms_norm(x, norm_w, 1e-6)
                        if rows <= GEMV_ROWS:
                            gguf_gemv(hh, raw, qtype, out=out, config=tile)
                        else:
                            gguf_gemm(hh, raw, qtype, out=out, config=tile)
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
