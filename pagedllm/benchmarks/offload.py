"""`bench throughput --compare-offload`: the host-memory KV tier (--kv-offload-bytes) against recomputing prefixes.

One engine with the tier and one without each run the requests once (their prompts' blocks go to the GPU prefix
cache and, with the tier, to host memory), reset the GPU prefix cache, then run the same requests again, timed: with
the tier the prompts' cached blocks come back by copy, without it they are computed again. `--num-prefixes K` gives
the requests K distinct shared prefixes in turn (P1 has one: once it is back in the GPU cache every later request
hits it there, so the tier saves one prefill; with one prefix per request it saves every one)."""

from __future__ import annotations

import time
from typing import Any, Sequence

from pagedllm.benchmarks import BenchSetup, release_memory
from pagedllm.benchmarks.workloads import BenchRequest


def run_offload_comparison(setup: BenchSetup, requests: Sequence[BenchRequest], temperature: float,
                           offload_bytes: int) -> dict[str, dict[str, Any]]:
    results = {name: _after_reset(setup, requests, temperature, size)
               for name, size in (("pagedllm-kv-offload", offload_bytes), ("pagedllm-recompute", 0))}
    tier, recompute = results["pagedllm-kv-offload"], results["pagedllm-recompute"]
    speedup = tier["requests_per_s"] / recompute["requests_per_s"]
    results["kv_offload_speedup"] = {"tier_over_recompute_requests_per_s": speedup}
    print(f"host KV tier / recompute after a GPU prefix-cache reset: {speedup:.2f}x requests/s "
          f"({tier['host_tier_hit_tokens']} prompt tokens from the tier)")
    return results


def default_offload_bytes(config: Any, requests: Sequence[BenchRequest]) -> int:
    """Room in the host tier for every prompt's full blocks (a block: keys and values of every layer)."""
    import torch

    hf = config.hf_config
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    itemsize = 1 if str(config.kv_cache_dtype).startswith("fp8") else torch.finfo(config.torch_dtype).bits // 8
    block_bytes = 2 * hf.num_hidden_layers * config.block_size * kv_heads * head_dim * itemsize
    return (sum(len(r.prompt_token_ids) // config.block_size for r in requests) + 1) * block_bytes


def _after_reset(setup: BenchSetup, requests: Sequence[BenchRequest], temperature: float,
                 offload_bytes: int) -> dict[str, Any]:
    from pagedllm import LLM, SamplingParams
    from pagedllm.benchmarks.throughput import _params, _prompt, _report

    llm = LLM(**(setup.llm_kwargs | {"kv_offload_bytes": offload_bytes, "enable_prefix_caching": True}))
    prompts = [_prompt(r) for r in requests]
    llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)  # fills the caches
    llm.reset_prefix_cache()  # the GPU's only: the host tier keeps its blocks
    before = llm.llm_engine.get_stats()
    start = time.perf_counter()
    outputs = llm.generate(prompts, [_params(temperature, r.output_len) for r in requests], use_tqdm=False)
    elapsed = time.perf_counter() - start
    after = llm.llm_engine.get_stats()
    del llm
    release_memory(setup.config.device)
    cached = after.prefix_cache_hits - before.prefix_cache_hits
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    name = "kv offload" if offload_bytes else "recompute"
    figures = _report(name, elapsed, sum(len(o.outputs[0].token_ids) for o in outputs),
                      cached / queries if queries else 0.0, requests)
    figures.update(kv_offload_bytes=offload_bytes, cached_prompt_tokens=cached,
                   host_tier_hit_tokens=after.external_prefix_cache_hits - before.external_prefix_cache_hits)
    print(f"[{name:>10}] {cached} cached prompt tokens ({figures['host_tier_hit_tokens']} from the host tier)")
    return figures
