"""GPU correctness: greedy outputs of a real model in float32 on CUDA equal transformers' on CUDA,
CUDA-graph outputs equal eager outputs (bf16 too; with a small token budget, mixed steps run as
piecewise graphs), async scheduling (the CUDA default) equals
synchronous steps, and prefix caching on equals off on prompts that share a prefix. Prints one JSON line per check.

    python benchmarks/gpu_identity.py [MODEL_DIR]     (default: the converted SmolLM2-135M-Instruct)
"""

from __future__ import annotations

import json
import random
import sys
import time

import torch


def main() -> None:
    from pagedllm import LLM, SamplingParams
    from pagedllm.models.gguf import resolve_model

    path = resolve_model(sys.argv[1] if len(sys.argv) > 1 else None)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rng = random.Random(0)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 300))] for _ in range(32)]
    max_tokens = [rng.randint(1, 48) for _ in prompts]

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    expected = []
    with torch.inference_mode():
        for prompt, m in zip(prompts, max_tokens):
            out = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=m, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device="cuda"), pad_token_id=0)
            expected.append(out[0, len(prompt):].tolist())
    del hf
    torch.cuda.empty_cache()

    def run(dtype: str, enforce_eager: bool, async_scheduling: bool = True, caching: bool = True, max_num_seqs: int = 64,
            max_num_batched_tokens: int | None = None) -> list[list[int]]:
        llm = LLM(path, dtype=dtype, skip_tokenizer_init=True, enforce_eager=enforce_eager, gpu_memory_utilization=0.5,
                  max_num_seqs=max_num_seqs, max_model_len=1024, async_scheduling=async_scheduling, enable_prefix_caching=caching,
                  max_num_batched_tokens=max_num_batched_tokens)
        params = [SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens]
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        engine = llm.llm_engine
        assert engine.kv_cache.num_used_blocks == 0 and not engine.has_unfinished_requests()
        del llm
        torch.cuda.empty_cache()
        hits = engine.get_stats().prefix_cache_hits
        print(json.dumps({"run": f"{dtype} eager={enforce_eager} async={async_scheduling} caching={caching} budget={max_num_batched_tokens}", "seconds": round(elapsed, 3),
                          "prefix_cache_hits": hits}), flush=True)
        return [o.outputs[0].token_ids for o in outs]

    graphs = run("float32", enforce_eager=False)
    eager = run("float32", enforce_eager=True)
    same = sum(g == e for g, e in zip(graphs, expected))
    first_diff = [i for i, (g, e) in enumerate(zip(graphs, expected)) if g != e][:5]
    print(json.dumps({"check": "float32 greedy == transformers (GPU)", "identical": f"{same}/{len(prompts)}", "differ": first_diff}))
    print(json.dumps({"check": "float32 graphs == eager", "identical": f"{sum(g == e for g, e in zip(graphs, eager))}/{len(prompts)}"}))
    sync = run("float32", enforce_eager=False, async_scheduling=False)
    print(json.dumps({"check": "float32 async == sync (graphs)", "identical": f"{sum(a == b for a, b in zip(graphs, sync))}/{len(prompts)}"}))
    seeded = [run_seeded(path, prompts, max_tokens, a) for a in (True, False)]
    print(json.dumps({"check": "float32 seeded sampling async == sync", "identical": f"{sum(a == b for a, b in zip(*seeded))}/{len(prompts)}"}))
    bf_graphs, bf_eager = run("bfloat16", False), run("bfloat16", True)
    print(json.dumps({"check": "bfloat16 graphs == eager", "identical": f"{sum(g == e for g, e in zip(bf_graphs, bf_eager))}/{len(prompts)}"}))
    # A 256-token budget: prompts arrive in chunks beside running decodes, steps of <= 256 tokens (piecewise graphs).
    chunked = run("float32", False, max_num_batched_tokens=256)
    print(json.dumps({"check": "float32 piecewise graphs (256-token steps) == transformers", "identical": f"{sum(a == b for a, b in zip(chunked, expected))}/{len(prompts)}"}))
    bf_chunked, bf_chunked_eager = run("bfloat16", False, max_num_batched_tokens=256), run("bfloat16", True, max_num_batched_tokens=256)
    print(json.dumps({"check": "bfloat16 piecewise graphs == eager (256-token steps)", "identical": f"{sum(a == b for a, b in zip(bf_chunked, bf_chunked_eager))}/{len(prompts)}"}))
    # Prefix caching: one 300-token system prompt before 192 prompts; all but the first request hit its blocks,
    # and decode batches run past the split-KV sizes, so with caching on they take the shared-prefix kernels.
    system = [rng.randrange(3, vocab) for _ in range(300)]
    prompts[:] = [system + p[:64] for p in prompts * 6]
    max_tokens[:] = max_tokens * 6
    for dtype in ("float32", "bfloat16"):
        cached, plain = run(dtype, False, caching=True, max_num_seqs=256), run(dtype, False, caching=False, max_num_seqs=256)
        print(json.dumps({"check": f"{dtype} prefix caching on == off (shared prefix)", "identical": f"{sum(a == b for a, b in zip(cached, plain))}/{len(prompts)}"}))


def run_seeded(path: str, prompts: list[list[int]], max_tokens: list[int], async_scheduling: bool) -> list[list[int]]:
    from pagedllm import LLM, SamplingParams

    # float32: batches differ between the modes (a finished request can ride one step longer), and
    # bf16 logits depend on the batch shape enough to flip a draw now and then.
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True, gpu_memory_utilization=0.5, max_num_seqs=64, max_model_len=1024,
              async_scheduling=async_scheduling)
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=i, max_tokens=m) for i, m in enumerate(max_tokens)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    del llm
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs]


if __name__ == "__main__":
    main()
