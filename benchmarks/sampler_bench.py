"""Times one sampling step on the GPU: the Triton kernels (filter thresholds, Gumbel-max draw) against the
torch path (float32 copy, temperature, softmax, top-k / sort for top-p, exponential race) on the same bf16
logits, at the decode batches of W1, W2 and L1: temperature alone, then with top_p 0.9, top_k 50, both,
and both after a repetition penalty (the kernels then read its float32 copy). Prints one JSON line per case.

    python benchmarks/sampler_bench.py
"""

from __future__ import annotations

import json

import torch
import triton.testing

from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.sampler import Sampler, SamplingBatch

FILTERS = {
    "top_p=0.9": dict(top_p=0.9),
    "top_k=50": dict(top_k=50),
    "top_k=50 top_p=0.9": dict(top_k=50, top_p=0.9),
    "top_k=50 top_p=0.9 repetition_penalty=1.1": dict(top_k=50, top_p=0.9, repetition_penalty=1.1),
}


def main() -> None:
    device = torch.device("cuda")
    shapes = [("W2 Qwen3-0.6B", 256, 151936, 0.6), ("W1 Llama-3-8B", 512, 128256, 1.0), ("batch 1, Qwen3", 1, 151936, 0.6)]
    for name, rows, vocab, temperature in shapes:
        logits = torch.randn(rows, vocab, device=device, dtype=torch.bfloat16) * 4
        for label, extra in ({"temperature": {}} | FILTERS).items():
            params = [SamplingParams(temperature=temperature, **extra)] * rows
            prompts = [list(range(64))] * rows  # tokens for the penalty to act on
            batch = SamplingBatch.build(params, [None] * rows, prompts, [[]] * rows, vocab, device)
            times = {}
            for path, use_kernel in (("kernel", True), ("torch", False)):
                sampler = Sampler(use_kernel=use_kernel)
                times[path] = triton.testing.do_bench(lambda: sampler(logits, batch), warmup=50, rep=300, return_mode="median")
            line = {"shape": name, "rows": rows, "vocab": vocab, "filters": label,
                    "kernel_ms": round(times["kernel"], 4), "torch_ms": round(times["torch"], 4),
                    "speedup": round(times["torch"] / times["kernel"], 2)}
            if not extra:  # one read of the logits: the Gumbel-max pass alone
                line["kernel_read_TBps"] = round(logits.numel() * logits.element_size() / times["kernel"] / 1e9, 2)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
