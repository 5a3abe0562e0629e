"""The multi-LoRA kernels at one model's layer shapes, on the GPU: what each layer's delta costs a decode step.

For each layer (q/k/v and gate/up stacked as the model runs them) and row count, with the rows' adapters spread over
--adapters slots of rank --rank: the row-indexed kernel (`bgmv_delta`, what decode CUDA graphs run: a split-K shrink
and an expand) and the segmented one (`lora_delta` with segments, eager steps), each as CUDA-graph replays, beside the
layer's base product (cuBLAS) at the same rows; checked first against the float64 per-adapter loop. The last line sums
the row-indexed deltas over every layer of the model: the LoRA time per decode step, to set beside `bench latency
--workload L1 --num-loras 1`. One JSON line each.

    python benchmarks/lora_bench.py --model llama3-8b --rank 16 --rows 1 8 64 --adapters 1 8
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from gemm_bench import layer_shapes, time_graph
from pagedllm.kernels.lora import LoRASegments, bgmv_delta, lora_delta
from pagedllm.lora.layers import lora_delta_ref

PARTS = {"qkv": 3, "o": 1, "gate_up": 2, "down": 1}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8], help="adapters the rows are spread over")
    args = parser.parse_args()
    from transformers import AutoConfig

    from pagedllm.benchmarks.workloads import shape_dir

    config = AutoConfig.from_pretrained(shape_dir(args.model))
    torch.manual_seed(0)
    per_step: dict[tuple[int, int], float] = {}
    for name, parts in PARTS.items():
        k, n = layer_shapes(config)[name]
        width = parts * args.rank
        slots = max(args.adapters)
        a = torch.randn(slots, width, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        b = torch.randn(slots, n, width, device="cuda", dtype=torch.bfloat16) * 0.01
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        for rows in args.rows:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            out = torch.zeros(rows, n, device="cuda", dtype=torch.bfloat16)
            base_us = time_graph(lambda: F.linear(x, weight, out=out), seconds=0.1) * 1e6
            for adapters in args.adapters:
                host_slots = np.arange(rows, dtype=np.int64) % adapters
                token_slots = torch.from_numpy(host_slots).cuda()
                segments = LoRASegments.build(host_slots, torch.device("cuda"))
                ref = lora_delta_ref(x.double(), a.double(), b.double(), torch.zeros(rows, n, dtype=torch.float64,
                                                                                      device="cuda"), token_slots)
                scale = ref.abs().max().item()
                for kernel, run in (("bgmv", lambda: bgmv_delta(x, a, b, out, token_slots)),
                                    ("sgmv", lambda: lora_delta(x, a, b, out, segments))):
                    out.zero_()
                    run()
                    err = (out.double() - ref).abs().max().item() / scale
                    us = time_graph(run, seconds=0.1) * 1e6
                    if kernel == "bgmv":
                        per_step[(rows, adapters)] = per_step.get((rows, adapters), 0.0) + us
                    print(json.dumps({"model": args.model, "layer": name, "rows": rows, "adapters": adapters,
                                      "kernel": kernel, "rank": args.rank, "n": n, "k": k, "delta_us": round(us, 2),
                                      "base_us": round(base_us, 2), "delta_over_base": round(us / base_us, 3),
                                      "rel_err": round(err, 5)}), flush=True)
        del a, b, weight
        torch.cuda.empty_cache()
    for (rows, adapters), us in per_step.items():
        print(json.dumps({"model": args.model, "rows": rows, "adapters": adapters, "rank": args.rank,
                          "lora_ms_per_decode_step": round(us * config.num_hidden_layers / 1e3, 3)}), flush=True)


if __name__ == "__main__":
    main()
