"""Times the paged-attention kernels on the GPU at decode and prefill shapes, as achieved KV-read
bandwidth, for several tile configurations. Each configuration is first checked against the torch
reference. Times are CUDA-graph replays (no host launch cost, as in the engine's decode graphs).
Prints one JSON line per measurement.

    python benchmarks/attention_bench.py [--prompt-sweep]

--prompt-sweep times only a W1 prefill step's shape, over warps and pipeline stages too.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton.testing

from pagedllm.kernels import sm_count
from pagedllm.kernels.paged_attention import paged_attention_ref, shared_prefix_decode, split_kv_decode, unified_attention


def make_batch(num_reqs: int, ctx: int, q_len: int, heads: int, kv_heads: int, head_dim: int, block_size: int = 16):
    blocks_per_seq = -(-ctx // block_size)
    num_blocks = num_reqs * blocks_per_seq + 1
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(num_blocks - 1, device="cuda")[: num_reqs * blocks_per_seq].view(num_reqs, blocks_per_seq).int()
    q = torch.randn(num_reqs * q_len, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    qsl = torch.arange(0, num_reqs * q_len + 1, q_len, device="cuda", dtype=torch.int32)
    seq_lens = torch.full((num_reqs,), ctx, device="cuda", dtype=torch.int32)
    return q, cache, qsl, seq_lens, tables


def shared_prefix_rows() -> None:
    """Decode batches whose requests share one prefix (P1's decode steps): the unified kernel, which reads
    the prefix once per (request, KV head), against the shared-prefix kernels, which read it once per KV head."""
    shapes = [  # (name, num_reqs, prefix, own context, heads, kv_heads)
        ("llama3-8b P1 decode 512 x (1024 shared + 96)", 512, 1024, 96, 32, 8),
        ("llama3-8b 256 x (1024 shared + 64)", 256, 1024, 64, 32, 8),
        ("llama3-8b 64 x (256 shared + 64)", 64, 256, 64, 32, 8),
        ("llama3-8b 64 x (1024 shared + 300)", 64, 1024, 300, 32, 8),
        ("qwen3-0.6b 256 x (1024 shared + 64)", 256, 1024, 64, 16, 8),
        ("qwen3-0.6b 128 x (256 shared + 400)", 128, 256, 400, 16, 8),
    ]
    for name, n, prefix, own, h, hkv in shapes:
        q, cache, qsl, seq_lens, tables = make_batch(n, prefix + own, 1, h, hkv, 128)
        tables[1:, : prefix // 16] = tables[0, : prefix // 16]
        common = torch.tensor([prefix], dtype=torch.int32, device="cuda")
        ref = paged_attention_ref(q, cache, qsl.tolist(), seq_lens.tolist(), tables, 128**-0.5).to(q.dtype)
        runs = {
            "unified": lambda out: unified_attention(q, cache, out, qsl, seq_lens, tables, 1, 128**-0.5),
            "shared_prefix": lambda out: shared_prefix_decode(q, cache, out, qsl, seq_lens, tables, common, 128**-0.5, sm_count(q.device)),
        }
        for kernel, fn in runs.items():
            out = torch.empty_like(q)
            fn(out)
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            ms = triton.testing.do_bench_cudagraph(lambda: fn(out), return_mode="median")
            print(json.dumps({"shape": name, "kernel": kernel, "ms": round(ms, 4), "rel_err": round(err, 5)}), flush=True)


def prompt_configs(sweep: bool) -> list[dict]:
    if not sweep:
        return [dict(block_m=m, tile_n=t) for m in (64, 128) for t in (32, 64, 128)]
    return [dict(block_m=m, tile_n=t, num_warps=w, num_stages=st)
            for m, t, w, st in itertools.product((128, 256), (32, 64, 128), (4, 8, 16), (2, 3, 4)) if m * t <= 16384]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-sweep", action="store_true")
    args = parser.parse_args()
    if not args.prompt_sweep:
        shared_prefix_rows()
    shapes = [  # (name, num_reqs, ctx, q_len, heads, kv_heads, head_dim)
        ("qwen3-0.6b decode 256x1000", 256, 1000, 1, 16, 8, 128),
        ("qwen3-0.6b decode 64x600", 64, 600, 1, 16, 8, 128),
        ("llama3-8b decode 256x600", 256, 600, 1, 32, 8, 128),
        ("llama3-8b decode 1x128", 1, 128, 1, 32, 8, 128),
        ("llama3-8b decode 1x384", 1, 384, 1, 32, 8, 128),
        ("qwen3-0.6b decode 16x1500", 16, 1500, 1, 16, 8, 128),
        ("qwen3-0.6b decode 32x300", 32, 300, 1, 16, 8, 128),
        ("llama3-8b decode 4x8000", 4, 8000, 1, 32, 8, 128),
        ("llama3-8b prefill 16x512", 16, 512, 512, 32, 8, 128),
        ("llama3-8b prefill 32x512", 32, 512, 512, 32, 8, 128),  # a W1 prefill step's attention per layer
    ]
    for name, n, ctx, q_len, h, hkv, d in shapes:
        if args.prompt_sweep and not name.endswith("prefill 32x512"):
            continue
        q, cache, qsl, seq_lens, tables = make_batch(n, ctx, q_len, h, hkv, d)
        ref = paged_attention_ref(q, cache, qsl.tolist(), seq_lens.tolist(), tables, d**-0.5).to(q.dtype)
        kv_bytes = n * ctx * hkv * d * 2 * 2
        # (num_warps 2/4/8 x num_stages 2/3/4 at 64-key tiles gave nothing over the default on an H200.)
        decode = [dict(block_m=16, tile_n=t) for t in (32, 64, 128)]
        configs = [dict()] + (decode if q_len == 1 else prompt_configs(args.prompt_sweep))
        for cfg in configs:
            out = torch.empty_like(q)
            try:
                unified_attention(q, cache, out, qsl, seq_lens, tables, q_len, d**-0.5, **cfg)
            except Exception as error:  # a config that does not compile (resources) is reported, not fatal
                print(json.dumps({"shape": name, "config": cfg, "error": str(error)[:120]}))
                continue
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            ms = triton.testing.do_bench_cudagraph(lambda: unified_attention(q, cache, out, qsl, seq_lens, tables, q_len, d**-0.5, **cfg), return_mode="median")
            causal_flops = 4 * n * h * d * q_len * (ctx - (q_len - 1) / 2)  # QK^T and PV over the visible keys
            print(json.dumps({"shape": name, "kernel": "unified", "config": cfg, "ms": round(ms, 4),
                              "kv_GBps": round(kv_bytes / ms / 1e6), "TFLOPs": round(causal_flops / ms / 1e9, 1),
                              "rel_err": round(err, 5)}), flush=True)
        if q_len == 1:
            out = torch.empty_like(q)
            split_kv_decode(q, cache, out, seq_lens, tables, d**-0.5)
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            ms = triton.testing.do_bench_cudagraph(lambda: split_kv_decode(q, cache, out, seq_lens, tables, d**-0.5), return_mode="median")
            print(json.dumps({"shape": name, "kernel": "split_kv", "ms": round(ms, 4),
                              "kv_GBps": round(kv_bytes / ms / 1e6), "rel_err": round(err, 5)}), flush=True)


if __name__ == "__main__":
    main()
