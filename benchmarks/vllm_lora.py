"""vLLM with LoRA on the llama3-8b shape (dummy weights): W1's requests over 8 random rank-16 adapters on all seven
projections, and L1 with one adapter; the adapters pagedllm's bench makes (pagedllm.benchmarks.lora). Run on the GPU
with vLLM on PYTHONPATH and ../shared/peers copied to .peers (see its README)."""
import os, random, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".peers"))
import bench_peers as bp  # noqa: E402

def main() -> None:
    from transformers import AutoConfig
    from pagedllm.benchmarks.lora import random_adapters
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    shape = "llama3-8b"
    d = bp.model_dir(shape)
    ours = random_adapters(AutoConfig.from_pretrained(d), 8, 16, "/tmp/vllm-loras")
    loras = [LoRARequest(r.lora_name, r.lora_int_id, r.lora_path) for r in ours]
    t = time.perf_counter()
    llm = LLM(model=d, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", max_model_len=2048,
              gpu_memory_utilization=0.90, seed=0, enable_lora=True, max_loras=8, max_lora_rank=16, max_cpu_loras=8)
    bp.log(what="vllm_lora_start", s=round(time.perf_counter() - t, 1))
    name, reqs, temp = bp.workload(shape)
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in reqs]
    sps = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=temp, detokenize=False) for _, o in reqs]
    per = [loras[i % 8] for i in range(len(reqs))]
    llm.generate(prompts[:8], sps[:8], lora_request=per[:8], use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate(prompts, sps, lora_request=per, use_tqdm=False)
    dt = time.perf_counter() - t
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    inp = sum(len(p) for p, _ in reqs)
    bp.log(what="throughput", engine="vllm", lora="8 adapters r16", workload=name, s=round(dt, 2),
           out_tok_s=round(gen / dt, 1), total_tok_s=round((gen + inp) / dt, 1))
    rng = random.Random(1)
    p = TokensPrompt(prompt_token_ids=[rng.randint(100, 128000) for _ in range(128)])
    sp = SamplingParams(max_tokens=256, ignore_eos=True, temperature=0.0, detokenize=False)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        llm.generate([p], [sp], lora_request=loras[0], use_tqdm=False)
        times.append(time.perf_counter() - t)
    times.sort()
    bp.log(what="latency", engine="vllm", lora="1 adapter r16", workload="L1", s=round(times[1], 3),
           tok_s=round(256 / times[1], 1))

if __name__ == "__main__":
    main()
