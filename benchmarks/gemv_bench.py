"""The small-batch GEMV kernel against cuBLAS at one model's linear shapes (weights row-major; o and down
also against cuBLAS on a column-major copy, "cublas NN", the layout cuBLAS is fastest with there), each
product timed after an RMSNorm, as in the model (the kernel overlaps the tail of the kernel before it through
programmatic dependent launch, so timing it alone would miss what it is for). CUDA-graph replays over enough
weight copies that each product reads its weight from memory, not L2. Prints one JSON line per (layer, rows,
kernel/tile).

    python benchmarks/gemv_bench.py --model llama3-8b --rows 1 2 4 [--sweep] [--fp8]

--fp8: the GEMV (and its sweep) on per-row-scaled float8_e4m3fn copies of the weights (W8A16), cuBLAS still on the
bf16 ones; rel_err then includes the weights' fp8 rounding, and weight_TBps counts 1 byte per fp8 weight.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from gemm_bench import layer_shapes, time_graph
from pagedllm.kernels.gemv import gemv, gemv_config
from pagedllm.kernels.norm import rms_norm
from pagedllm.quantization.fp8_utils import quantize_per_channel

# (BLOCK_N, BLOCK_K, num_warps, num_stages, splits) for one row and for several; dots need BLOCK_N >= 16.
# Splits of the input width give narrow layers (Qwen3-0.6B's o and down: 1024 outputs) enough programs.
# (Column-major weights, with wide tiles and 1-8 splits, lost to cuBLAS NN by 1.4-4.8x: RESULTS.md, session 11.)
SWEEPS = {
    1: [c for c in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (3,), (1, 2, 4)) if 2048 <= c[0] * c[1] <= 16384],
    2: list(itertools.product((16, 32, 64), (128, 256), (4,), (3,), (1, 2, 4))),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", nargs="+", default=["qkv", "o", "gate_up", "down", "lm_head"])
    parser.add_argument("--sweep", action="store_true", help="time every tile of the SWEEP lists too")
    parser.add_argument("--fp8", action="store_true", help="GEMV tiles on fp8 weights with per-row scales")
    args = parser.parse_args()
    from transformers import AutoConfig

    from pagedllm.benchmarks.workloads import shape_dir

    config = AutoConfig.from_pretrained(shape_dir(args.model))
    for name in args.layers:
        k, n = layer_shapes(config)[name]
        copies = max(2, -(-400_000_000 // (2 * n * k)))  # > 400 MB of weights per replay: several times the L2
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(copies)]
        # the row-parallel layers' layout on GPUs without the GEMV
        column_major = [w.t().contiguous().t() for w in weights] if name in ("o", "down") else []
        fp8 = [quantize_per_channel(w) for w in weights] if args.fp8 else []  # (weight, scale [n, 1]) pairs
        norm_w = torch.ones(k, device="cuda", dtype=torch.bfloat16)
        for rows in args.rows:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
            norm_us = time_graph(lambda: rms_norm(x, norm_w, 1e-6), iters=copies, seconds=0.2) * 1e6
            ref = F.linear(rms_norm(x, norm_w, 1e-6), weights[-1]).float()  # what the last product of a step writes
            runs = {"cublas": None, "gemv": gemv_config(rows, n, k)} | ({"cublas NN": None} if column_major else {})
            if args.sweep:
                runs.update({f"gemv {c}": c for c in SWEEPS[min(rows, 2)]})
            for label, tile in runs.items():
                def step(tile=tile, weights=column_major if label == "cublas NN" else weights) -> None:
                    for i, w in enumerate(weights):
                        h = rms_norm(x, norm_w, 1e-6)
                        if tile is None:
                            F.linear(h, w, out=out)
                        elif fp8:
                            gemv(h, fp8[i][0], out=out, config=tile, weight_scale=fp8[i][1])
                        else:
                            gemv(h, w, out=out, config=tile)
                try:
                    us = time_graph(step, iters=1, seconds=0.1) / copies * 1e6
                except Exception as exc:  # a tile too large for shared memory, say
                    print(json.dumps({"layer": name, "rows": rows, "kernel": label, "error": str(exc)[:120]}), flush=True)
                    continue
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                w_bytes = 1 if fp8 and tile is not None else 2
                print(json.dumps({"model": args.model, "layer": name, "rows": rows, "kernel": label, "n": n, "k": k,
                                  "norm_plus_linear_us": round(us, 2), "linear_us": round(us - norm_us, 2),
                                  "weight_TBps": round(w_bytes * n * k / (us - norm_us) / 1e6, 2),
                                  "rel_err": round(err, 5)}), flush=True)
        del weights, column_major, fp8
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
