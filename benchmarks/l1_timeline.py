"""Where one single-stream request's time goes (workload L1): engine steps timed on the host, and the
GPU's idle gaps from the torch profiler, over one `generate` after a warm-up.

    python benchmarks/l1_timeline.py --model llama3-8b [--input-len 128] [--output-len 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    args = parser.parse_args()

    from pagedllm import LLM, SamplingParams
    from pagedllm.benchmarks.workloads import shape_dir

    llm = LLM(shape_dir(args.model), load_format="dummy", skip_tokenizer_init=True, max_model_len=4096)
    engine = llm.llm_engine
    prompt = {"prompt_token_ids": [(j * 7) % 30000 + 10 for j in range(args.input_len)]}
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)  # warm-up

    stamps: list[tuple[float, float]] = []
    step = engine.step

    def timed_step():
        start = time.perf_counter()
        out = step()
        stamps.append((start, time.perf_counter()))
        return out

    engine.step = timed_step
    llm.reset_prefix_cache()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        begin = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - begin
    engine.step = step
    durations = [(b - a) * 1e3 for a, b in stamps]
    print(f"{args.model} L1 {args.input_len}/{args.output_len}: {wall * 1e3:.1f} ms wall (profiled), {len(stamps)} steps; "
          f"first step starts {(stamps[0][0] - begin) * 1e3:.2f} ms after generate(); after the last step {(begin + wall - stamps[-1][1]) * 1e3:.2f} ms")
    print("first 6 steps (ms):", [round(d, 2) for d in durations[:6]], " last 4:", [round(d, 2) for d in durations[-4:]])
    print(f"step ms: median {statistics.median(durations):.3f}, mean {statistics.mean(durations):.3f}, max {max(durations):.2f}; "
          f"sum {sum(durations):.1f}; between steps {sum((stamps[i + 1][0] - stamps[i][1]) * 1e3 for i in range(len(stamps) - 1)):.1f}")
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == "CUDA")
    busy, gaps, edge = 0.0, [], kernels[0][0]
    for start, end in kernels:
        if start > edge:
            gaps.append((start - edge, edge))
        busy += max(0.0, end - max(start, edge))
        edge = max(edge, end)
    span = kernels[-1][1] - kernels[0][0]
    print(f"GPU: first kernel to last {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms ({100 * busy / span:.0f}%), "
          f"{len(kernels)} kernels; idle gaps > 20 us: {sum(g for g, _ in gaps if g > 20) / 1e3:.1f} ms in {sum(1 for g, _ in gaps if g > 20)}")
    t0 = kernels[0][0]
    print("largest gaps (us @ ms from the first kernel):", [(round(g), round((at - t0) / 1e3, 2)) for g, at in sorted(gaps, reverse=True)[:12]])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
