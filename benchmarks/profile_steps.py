"""Where a step's time goes on the GPU: wall time per step vs GPU kernel time per step (the difference is the
GPU waiting on the CPU), and the top kernels. Decode steps by default; `--phase prefill` times steps that only
prefill (`--num-reqs` prompts of `--ctx` tokens each, one output token, as many per step as the token budget
takes: W1's first steps).

    python benchmarks/profile_steps.py --model qwen3-0.6b --num-reqs 256 --ctx 600 --steps 20
    python benchmarks/profile_steps.py --model llama3-8b --phase prefill --num-reqs 512 --ctx 512 --steps 5
    python benchmarks/profile_steps.py --model llama3-8b --num-reqs 500 --ctx 64 --shared-prefix 1024 --temperature 0

`--shared-prefix N` puts one N-token prefix before every prompt (P1's decode steps).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--num-reqs", type=int, default=256)
    parser.add_argument("--ctx", type=int, default=600)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--shared-prefix", type=int, default=0)
    parser.add_argument("--phase", choices=["decode", "prefill"], default="decode")
    args = parser.parse_args()

    from pagedllm import LLM, SamplingParams
    from pagedllm.benchmarks.workloads import shape_dir

    llm = LLM(shape_dir(args.model), load_format="dummy", skip_tokenizer_init=True, max_model_len=4096,
              max_num_seqs=min(max(args.num_reqs, 1), 512), enforce_eager=args.enforce_eager)
    engine = llm.llm_engine
    max_tokens = 1 if args.phase == "prefill" else args.steps * 3 + 10
    params = SamplingParams(temperature=args.temperature, max_tokens=max_tokens, ignore_eos=True)
    for i in range(args.num_reqs):
        prefix = [(j * 13) % 30000 + 10 for j in range(args.shared_prefix)]
        prompt = prefix + [(i * 7 + j) % 30000 + 10 for j in range(args.ctx)]
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    if args.phase == "decode":
        while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                              for r in engine.scheduler.running):
            engine.step()  # prefill everything first
    for _ in range(2 if args.phase == "prefill" else 5):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / args.steps
    print(f"{args.model} {args.phase}, {args.num_reqs} requests x ~{args.ctx} context (+{args.shared_prefix} shared): {wall * 1e3:.2f} ms per step wall, "
          f"{gpu_us / 1e3:.2f} ms of GPU kernels per step ({100 * gpu_us / 1e3 / (wall * 1e3):.0f}% busy)")
    print(events.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
