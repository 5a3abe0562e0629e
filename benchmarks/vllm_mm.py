"""vLLM on the requests of `pagedllm bench mm` (pagedllm.benchmarks.multimodal.build_requests): Qwen2.5-VL-7B
shape, random weights, N requests with one image each. Run on the GPU with vLLM on PYTHONPATH (../shared/peers)."""
import json, sys, time

def main() -> None:
    from pagedllm.benchmarks.multimodal import build_requests, write_shape
    from vllm import LLM, SamplingParams
    n, size, input_len, output_len = (int(a) for a in sys.argv[1:5])
    path = write_shape("qwen2.5-vl-7b", "/tmp/vllm-shapes/qwen2.5-vl-7b")
    requests = build_requests(path, n + 4, size, input_len)
    t = time.perf_counter()
    llm = LLM(model=path, load_format="dummy", dtype="bfloat16", max_model_len=4096, gpu_memory_utilization=0.90,
              seed=0, limit_mm_per_prompt={"image": 1, "video": 0})
    print(json.dumps({"what": "vllm_start", "s": round(time.perf_counter() - t, 1)}), flush=True)
    prompts = [{"prompt_token_ids": ids, "multi_modal_data": {"image": image}} for ids, image in requests]
    sp = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0, detokenize=False)
    llm.generate(prompts[:4], sp, use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate(prompts[4:], sp, use_tqdm=False)
    dt = time.perf_counter() - t
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    total = gen + sum(len(o.prompt_token_ids) for o in outs)
    print(json.dumps({"what": "mm_throughput", "engine": "vllm", "requests": len(outs), "s": round(dt, 2),
                      "req_s": round(len(outs) / dt, 2), "out_tok_s": round(gen / dt, 1),
                      "total_tok_s": round(total / dt, 1),
                      "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs) / len(outs)}), flush=True)

if __name__ == "__main__":
    main()
