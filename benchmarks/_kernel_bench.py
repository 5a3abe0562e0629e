"""What int_gemm_bench.py and gguf_gemm_bench.py share, one copy so that their figures are taken, and mean, the same:
the command line (one model's layers at several row counts), the tiles a --sweep times, and each product timed after
an RMSNorm (the GEMV overlaps the kernel before it through programmatic dependent launch) as CUDA-graph replays over
enough weight copies that each reads its weight from memory, not L2, once its result is checked against the float32
product with its dequantized weight; one JSON line per (layer, rows, kernel/tile).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gemm_bench import layer_shapes, time_graph
from pagedllm.kernels.norm import rms_norm


@dataclass
class Run:
    """One kernel at one row count: product(normed rows, copy) writes x @ copy.T to the row count's `out`."""

    label: str
    copies: Sequence[Any]  # the weight's copies, one product each per replay
    product: Callable[[torch.Tensor, Any], None]
    ref_w: torch.Tensor  # the last copy's weight (dequantized), for the check
    w_bytes: float  # the weight's bytes per element, for weight_TBps


def main(add_args: Callable[[argparse.ArgumentParser], None],
         bench_layer: Callable[[argparse.Namespace, int, int, str], None]) -> None:
    """The shared options (a benchmark's own, from `add_args`, before --sweep), then bench_layer(args, k, n, name)
    for each of --layers at --model's shapes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 256, 1024, 4096])
    parser.add_argument("--layers", nargs="+", default=["qkv", "o", "gate_up", "down"])
    add_args(parser)
    parser.add_argument("--sweep", action="store_true", help="time every tile of the SWEEPS lists too")
    args = parser.parse_args()
    from transformers import AutoConfig

    from pagedllm.benchmarks.workloads import shape_dir

    config = AutoConfig.from_pretrained(shape_dir(args.model))
    for name in args.layers:
        bench_layer(args, *layer_shapes(config)[name], name)


def copies(bytes_per_weight: float, n: int, k: int) -> int:
    """Copies of an [n, k] weight for > 400 MB of weights per replay: several times the L2."""
    return max(2, -(-400_000_000 // int(bytes_per_weight * n * k)))


def sweep_configs(sweeps: dict[str, list[tuple[int, ...]]], rows: int, gemv_rows: int) -> list[tuple[int, ...]]:
    """The tiles --sweep times at `rows`: sweeps["gemv 1"], ["gemv 16"] (up to gemv_rows), ["gemm 64"] (its
    BLOCK_M, 0, set by the rows) or ["gemm big"]."""
    if rows == 1:
        return sweeps["gemv 1"]
    if rows <= gemv_rows:
        return sweeps["gemv 16"]
    if rows <= 64:
        bm = max(16, 1 << (rows - 1).bit_length())
        return [(bm, *c[1:]) for c in sweeps["gemm 64"]]
    return sweeps["gemm big"]


def bench_rows(args: argparse.Namespace, name: str, n: int, k: int, weights: Sequence[torch.Tensor],
               runs: Callable[[int, torch.Tensor], list[Run]]) -> None:
    """Every --rows count of one [n, k] layer: cuBLAS bf16 on `weights` (its copies), then runs(rows, out)."""
    dt = torch.bfloat16
    norm_w = torch.ones(k, device="cuda", dtype=dt)
    for rows in args.rows:
        x = torch.randn(rows, k, device="cuda", dtype=dt)
        out = torch.empty(rows, n, device="cuda", dtype=dt)
        norm_us = time_graph(lambda: rms_norm(x, norm_w, 1e-6), iters=4, seconds=0.2) * 1e6
        h = rms_norm(x, norm_w, 1e-6).float()
        cublas = Run("cublas bf16", weights, lambda hh, w: F.linear(hh, w, out=out), weights[-1], 2)
        for run in [cublas, *runs(rows, out)]:
            def step(run: Run = run) -> None:
                for w in run.copies:
                    run.product(rms_norm(x, norm_w, 1e-6), w)
            try:
                step()  # the last copy's product, checked before it is timed
                torch.cuda.synchronize()
                ref = h @ run.ref_w.float().T
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                if not err < 2e-2:
                    raise RuntimeError(f"wrong result: relative error {err:.3g}")
                us = time_graph(step, iters=1, seconds=0.1) / len(run.copies) * 1e6
            except Exception as exc:  # a tile too large for shared memory, say
                print(json.dumps({"model": args.model, "layer": name, "rows": rows, "kernel": run.label,
                                  "error": str(exc)[:160]}), flush=True)
                continue
            lin = max(us - norm_us, 1e-3)
            print(json.dumps({"model": args.model, "layer": name, "rows": rows, "kernel": run.label, "n": n, "k": k,
                              "norm_plus_linear_us": round(us, 2), "linear_us": round(lin, 2),
                              "TFLOPs": round(2 * rows * n * k / lin / 1e6, 1),
                              "weight_TBps": round(run.w_bytes * n * k / lin / 1e6, 2), "rel_err": round(err, 5)}),
                  flush=True)
