"""Times one sampling step on the GPU: the Gumbel-max kernel against the torch path (float32 copy,
temperature, softmax, exponential race) on the same bf16 logits, at the decode batches of W1, W2 and
L1. Prints one JSON line per shape.

    python benchmarks/sampler_bench.py
"""

from __future__ import annotations

import json

import torch
import triton.testing

from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.sampler import Sampler, SamplingBatch


def main() -> None:
    device = torch.device("cuda")
    shapes = [("W2 Qwen3-0.6B", 256, 151936, 0.6), ("W1 Llama-3-8B", 512, 128256, 1.0), ("batch 1, Qwen3", 1, 151936, 0.6)]
    for name, rows, vocab, temperature in shapes:
        logits = torch.randn(rows, vocab, device=device, dtype=torch.bfloat16) * 4
        params = [SamplingParams(temperature=temperature)] * rows
        batch = SamplingBatch.build(params, [None] * rows, [[1]] * rows, [[]] * rows, vocab, device)
        times = {}
        for label, use_kernel in (("kernel", True), ("torch", False)):
            sampler = Sampler(use_kernel=use_kernel)
            times[label] = triton.testing.do_bench(lambda: sampler(logits, batch), warmup=50, rep=300, return_mode="median")
        bytes_read = logits.numel() * logits.element_size()
        print(json.dumps({
            "shape": name, "rows": rows, "vocab": vocab, "kernel_ms": round(times["kernel"], 4), "torch_ms": round(times["torch"], 4),
            "speedup": round(times["torch"] / times["kernel"], 2), "kernel_read_TBps": round(bytes_read / times["kernel"] / 1e9, 2),
        }))


if __name__ == "__main__":
    main()
