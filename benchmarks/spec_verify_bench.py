"""The verify step's cost against a plain decode step (issue 27's draft-model target): one request of L1's shape
(128 in / 256 out, greedy) on a random-weight model, first without speculation (async scheduling, as users run it),
then with k = 1..5 drafts per step from a proposer that always guesses (random weights accept nothing, so every
step emits one token and tokens/s is the inverse of the step time). Prints each k's step time against the plain
decode step and the speedup an acceptance rate a would then give: (1 - a^(k+1)) / (1 - a) tokens per step over
that cost. JSON lines.

    python benchmarks/spec_verify_bench.py [--model llama3-8b] [--ks 1 2 3 4 5]
"""

from __future__ import annotations

import argparse
import json
import time

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.workloads import shape_dir
from pagedllm.spec_decode.decoder import SpecDecoder


class _Guess:
    def propose_batch(self, batch, running):  # type: ignore[no-untyped-def]
        return [[7] * k for _, k in batch]

    def retain(self, request_ids: set[str]) -> None:
        pass


def _step_ms(llm: LLM, prompt: list[int], out: int, iters: int = 3) -> float:
    params = SamplingParams(temperature=0, max_tokens=out, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(iters):
        llm.reset_prefix_cache()
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] / out * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--output-len", type=int, default=256)
    args = parser.parse_args()
    path = shape_dir(args.model)
    prompt = [1000 + i for i in range(128)]
    common = dict(load_format="dummy", skip_tokenizer_init=True, max_model_len=2048)
    plain = LLM(path, **common)
    base = _step_ms(plain, prompt, args.output_len)
    print(json.dumps({"model": args.model, "k": 0, "step_ms": round(base, 3)}), flush=True)
    del plain
    llm = LLM(path, speculative_config={"method": "ngram", "num_speculative_tokens": max(args.ks)}, **common)
    engine = llm.llm_engine
    for k in args.ks:
        config = type(engine.config.speculative_config)(method="ngram", num_speculative_tokens=k)
        engine.spec = SpecDecoder(config, 2048, _Guess())
        ms = _step_ms(llm, prompt, args.output_len)
        implied = {str(a): round((1 - a ** (k + 1)) / (1 - a) / (ms / base), 2) for a in (0.5, 0.7, 0.9)}
        print(json.dumps({"model": args.model, "k": k, "step_ms": round(ms, 3), "cost_vs_decode": round(ms / base, 3),
                          "implied_speedup_by_acceptance": implied}), flush=True)


if __name__ == "__main__":
    main()
