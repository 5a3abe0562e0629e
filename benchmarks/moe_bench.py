"""The fused MoE layer (pagedllm/kernels/fused_moe.py) at the bundled MoE shapes (qwen3-30b-a3b: 128 experts of 768,
top-8; mixtral-8x7b: 8 of 14336, top-2) against a torch per-expert bf16 loop, over token counts 1..4096: time per
layer call (routing included, CUDA-graph replays, which also proves the path captures), the weight bytes it must read
(the distinct experts its tokens picked, so a decode step's are the selected experts' only), FLOPs, and the achieved
TB/s and TFLOP/s. One JSON line per (shape, tokens, kernel/tile); each kernel is checked against the float32 loop.

    python benchmarks/moe_bench.py [--model qwen3-30b-a3b mixtral-8x7b] [--tokens 1 16 256 4096] [--tp 1] [--sweep]

--sweep also times every tile of SWEEP and prints, per shape, `TUNED` entries for pagedllm/kernels/fused_moe.py
(the best tile per token count, as "up to this many tokens").
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from transformers import AutoConfig

from gemm_bench import time_graph
from pagedllm.benchmarks.workloads import shape_dir
from pagedllm.kernels.fused_moe import fused_moe, fused_moe_ref, moe_config, route

SWEEP = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
         for m, n, k, w, s in itertools.product((16, 32, 64, 128), (32, 64, 128, 256), (64, 128, 256), (4, 8), (3, 4, 5))
         if (m * k + 2 * n * k) * 2 * s <= 200_000]  # the pipelined tiles must fit shared memory


def shape(name: str, tp: int) -> tuple[int, int, int, int, bool]:
    """(experts, hidden, intermediate per rank, top_k, renormalize)."""
    c = AutoConfig.from_pretrained(shape_dir(name))
    experts = getattr(c, "num_experts", None) or c.num_local_experts
    inter = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    return experts, c.hidden_size, inter // tp, c.num_experts_per_tok, bool(getattr(c, "norm_topk_prob", True))


def time_eager(fn, iters: int = 10) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", nargs="+", default=["qwen3-30b-a3b", "mixtral-8x7b"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--tp", type=int, default=1, help="the intermediate size split over this many ranks")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    for name in args.model:
        experts, hidden, inter, top_k, renorm = shape(name, args.tp)
        g = torch.Generator(device=dev).manual_seed(0)
        w13 = torch.randn(experts, 2 * inter, hidden, device=dev, dtype=dt, generator=g) / hidden**0.5
        w2 = torch.randn(experts, hidden, inter, device=dev, dtype=dt, generator=g) / inter**0.5
        router = torch.randn(experts, hidden, device=dev, dtype=dt, generator=g) / hidden**0.5
        best: dict[int, dict] = {}
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, device=dev, dtype=dt, generator=g)
            weights, ids = route(x @ router.T, top_k, renorm)
            hit = int(ids.unique().numel())
            w_bytes = hit * 3 * inter * hidden * 2
            io_bytes = w_bytes + 2 * tokens * hidden * 2
            flops = 2 * tokens * top_k * 3 * inter * hidden
            ref = fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids)
            base = dict(shape=name, tp=args.tp, tokens=tokens, experts_hit=hit, weight_MB=round(w_bytes / 1e6, 1),
                        GFLOP=round(flops / 1e9, 2))

            def report(label: str, seconds: float, out: torch.Tensor, **extra) -> None:
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                print(json.dumps(dict(base, kernel=label, us=round(seconds * 1e6, 1), TBps=round(io_bytes / seconds / 1e12, 3),
                                      TFLOPs=round(flops / seconds / 1e12, 1), rel_err=round(err, 5), **extra)), flush=True)

            def layer(config=None):  # routing included, as the layer runs it
                w, i = route(x @ router.T, top_k, renorm)
                return fused_moe(x, w13, w2, w, i, config=config)

            report("fused", time_graph(layer), layer(), config=moe_config(tokens, experts, inter, hidden, top_k))
            if tokens <= 1024:  # the loop syncs per expert: eager timing only
                report("torch loop", time_eager(lambda: fused_moe_ref(x, w13, w2, weights.to(dt), ids)),
                       fused_moe_ref(x, w13, w2, weights.to(dt), ids))
            if args.sweep:
                for cfg in SWEEP:
                    try:
                        seconds = time_graph(lambda: layer(cfg), iters=5, seconds=0.1)
                    except Exception as error:  # noqa: BLE001 - a tile may not fit; report it and go on
                        print(json.dumps(dict(base, kernel=f"tile {cfg}", error=str(error)[:200])))
                        continue
                    report(f"tile {cfg}", seconds, layer(cfg))
                    if seconds < best.get(tokens, {}).get("s", float("inf")):
                        best[tokens] = dict(s=seconds, cfg=cfg)
        if best:
            entries = [(t, best[t]["cfg"]) for t in sorted(best)]
            print(f"# TUNED[{(experts, inter, hidden, top_k)}] = {entries!r}", flush=True)


if __name__ == "__main__":
    main()
