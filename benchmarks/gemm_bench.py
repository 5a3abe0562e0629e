"""cuBLAS speed at the linear-layer shapes of one model (bf16 `F.linear`, as the model runs them): TFLOP/s and
weight-read TB/s per shape and token count, timed as CUDA-graph replays so launch gaps do not count, over
about half a second of back-to-back work (the clock a long run settles at, not a cold burst). `--chunks N`
also times each token count as N GEMMs over row slices.

    python benchmarks/gemm_bench.py --model llama3-8b --tokens 1 512 16384 --chunks 4
"""

from __future__ import annotations

import argparse
import json

import torch


def layer_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer, with q/k/v and gate/up merged as the model runs them."""
    h, d = config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return {"qkv": (h, q + 2 * kv), "o": (q, h), "gate_up": (h, 2 * config.intermediate_size),
            "down": (config.intermediate_size, h), "lm_head": (h, config.vocab_size)}


def time_graph(fn, iters: int = 20, seconds: float = 0.5) -> float:
    """Seconds per call of `fn`, replayed from a CUDA graph of `iters` calls for about `seconds`."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    replays = max(2, int(seconds / (start.elapsed_time(end) / 1e3)))
    for _ in range(replays // 2):  # settle the clocks
        graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (replays * iters)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 512, 16384])
    parser.add_argument("--chunks", type=int, default=1)
    args = parser.parse_args()
    from transformers import AutoConfig

    from pagedllm.benchmarks.workloads import shape_dir

    config = AutoConfig.from_pretrained(shape_dir(args.model))
    for name, (k, n) in layer_shapes(config).items():
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for m in args.tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            runs = [(1, lambda: torch.matmul(x, weight.t(), out=out))]
            if args.chunks > 1 and m % args.chunks == 0 and m > args.chunks:
                pieces = list(zip(x.chunk(args.chunks), out.chunk(args.chunks)))
                runs.append((args.chunks, lambda: [torch.matmul(a, weight.t(), out=o) for a, o in pieces]))
            for chunks, run in runs:
                seconds = time_graph(run)
                print(json.dumps({"model": args.model, "layer": name, "tokens": m, "chunks": chunks, "k": k, "n": n,
                                  "us": round(seconds * 1e6, 1), "TFLOPs": round(2 * m * n * k / seconds / 1e12, 1),
                                  "weight_TBps": round(2 * n * k / seconds / 1e12, 2)}), flush=True)


if __name__ == "__main__":
    main()
