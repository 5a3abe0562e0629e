"""Tensor parallelism on GPUs: greedy outputs of a model in float32 with --tensor-parallel-size N must
equal the single-GPU outputs. Run once per size (one parallel engine per process), then compare:

    python benchmarks/gpu_tp_identity.py MODEL 1 /tmp/tp1.json
    python benchmarks/gpu_tp_identity.py MODEL 2 /tmp/tp2.json
    python benchmarks/gpu_tp_identity.py --compare /tmp/tp1.json /tmp/tp2.json
"""

from __future__ import annotations

import json
import random
import sys


def main() -> None:
    if sys.argv[1] == "--compare":
        a, b = (json.load(open(p)) for p in sys.argv[2:4])
        same = sum(x == y for x, y in zip(a, b))
        print(json.dumps({"check": "float32 greedy, tensor parallel == single GPU", "identical": f"{same}/{len(a)}"}))
        return
    from transformers import AutoConfig

    from pagedllm import LLM, SamplingParams

    path, tp, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    vocab = AutoConfig.from_pretrained(path).vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 300))] for _ in range(32)]
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, tensor_parallel_size=tp, gpu_memory_utilization=0.5, max_model_len=1024)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    json.dump([o.outputs[0].token_ids for o in outs], open(out, "w"))


if __name__ == "__main__":
    main()
