"""Tensor/pipeline parallelism on GPUs: greedy outputs of a model in float32 on several GPUs (CUDA graphs
on, or --enforce-eager) must equal the single-GPU outputs (MODEL: a Hugging Face directory or a .gguf file). Run once per layout (one parallel engine per
process), then compare:

    python benchmarks/gpu_tp_identity.py MODEL /tmp/tp1.json
    python benchmarks/gpu_tp_identity.py MODEL /tmp/tp2.json --tp 2
    python benchmarks/gpu_tp_identity.py MODEL /tmp/tp2pp2-eager.json --tp 2 --pp 2 --enforce-eager
    python benchmarks/gpu_tp_identity.py --compare /tmp/tp1.json /tmp/tp2.json ...
"""

from __future__ import annotations

import argparse
import json
import random
import sys


def main() -> None:
    if sys.argv[1] == "--compare":
        base, *others = sys.argv[2:]
        a = json.load(open(base))
        for path in others:
            b = json.load(open(path))
            same = sum(x == y for x, y in zip(a, b))
            print(json.dumps({"check": f"float32 greedy, {path} == {base}", "identical": f"{same}/{len(a)}"}))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()
    from pagedllm import LLM, SamplingParams

    llm = LLM(args.model, dtype="float32", skip_tokenizer_init=True, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
              enforce_eager=args.enforce_eager, gpu_memory_utilization=0.5, max_model_len=1024)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, llm.llm_engine.vocab_size) for _ in range(rng.randint(1, 300))] for _ in range(32)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    json.dump([o.outputs[0].token_ids for o in outs], open(args.out, "w"))


if __name__ == "__main__":
    main()
