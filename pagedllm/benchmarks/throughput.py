"""`pagedllm bench throughput`: every request submitted at once, timed until the last one finishes.

Prompts are random token ids of fixed (or workload-drawn) lengths and EOS is ignored, so each request
generates exactly its output length and the token counts are the same for every backend.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import time
from typing import Any, Sequence

from pagedllm.benchmarks import lora as bench_lora
from pagedllm.benchmarks import BenchSetup, describe, finish, prepare, release_memory, spec_decode_figures
from pagedllm.benchmarks.workloads import BenchRequest, make_requests

_WARMUP_PROMPTS, _WARMUP_TOKENS = 16, 8

_HF_BATCH_SIZE = 256  # the issues' baseline: transformers in static batches of 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=None, help="number of requests (default 64)")
    parser.add_argument("--prefix-len", type=int, default=None, help="random tokens shared by every prompt, before its own --input-len (default 0)")
    parser.add_argument("--num-prefixes", type=int, default=1,
                        help="distinct --prefix-len prefixes, taken by the requests in turn (default 1)")
    parser.add_argument("--compare-offload", action="store_true",
                        help="after a GPU prefix-cache reset, run the requests with the host KV tier "
                             "(--kv-offload-bytes, default: room for every prompt) and without it; report the ratio")
    parser.add_argument("--compare-prefix-caching", action="store_true",
                        help="also run pagedllm with prefix caching flipped (off if on), in this process, and report the speed-up")
    parser.add_argument("--structured-output", choices=["json"], default=None,
                        help="run the batch with every request held to a JSON schema, then free with the same output "
                             "lengths; report the tokens/s ratio and grammar compile times")
    bench_lora.add_arguments(parser)
    parser.add_argument("--hf-batch-size", type=int, default=None, help="static batch size of the hf backend (default: 256, the largest that fits an 8B model on an 80 GB GPU)")


def main(args: argparse.Namespace) -> dict[str, Any]:
    setup = prepare(args, "throughput")
    if args.structured_output:
        from pagedllm.benchmarks.structured import run_structured

        print(describe(setup))
        figures = run_structured(setup, args.num_prompts, args.output_len, args.temperature)
        return finish("throughput", args, setup, {"structured_output": figures})
    requests = make_requests(args.num_prompts, args.input_len, args.output_len, setup.token_pool, args.seed,
                             args.prefix_len, args.num_prefixes)
    print(describe(setup))
    print(_describe_workload(args, requests))
    results: dict[str, dict[str, Any]] = {}
    if args.compare_offload:
        from pagedllm.benchmarks.offload import default_offload_bytes, run_offload_comparison

        size = args.kv_offload_bytes or default_offload_bytes(setup.config, requests)
        results = run_offload_comparison(setup, requests, args.temperature, size)
        return finish("throughput", args, setup, results)
    if args.backend in ("pagedllm", "both"):
        loras = None
        if args.num_loras:  # the base model alone first, then the same requests over the adapters
            results["pagedllm-no-lora"] = _report("no lora", *run_pagedllm(setup, requests, args.temperature), requests)
            loras = bench_lora.random_adapters(setup.config.hf_config, args.num_loras, args.lora_rank)
            loras = [loras[i % len(loras)] for i in range(len(requests))]
        overrides = bench_lora.engine_overrides(args.num_loras, args.lora_rank) if loras else {}
        results["pagedllm"] = _report("pagedllm", *run_pagedllm(setup, requests, args.temperature, loras, **overrides), requests)
        if loras:
            ratio = results["pagedllm"]["output_tokens_per_s"] / results["pagedllm-no-lora"]["output_tokens_per_s"]
            results["pagedllm"]["ratio_over_no_lora"] = ratio
            print(f"{args.num_loras} LoRA adapters of rank {args.lora_rank} / base model: {ratio:.3f}x output tokens/s")
        if args.compare_prefix_caching:
            caching = not setup.config.enable_prefix_caching
            name = "pagedllm-" + ("" if caching else "no-") + "prefix-caching"
            results[name] = _report(name, *run_pagedllm(setup, requests, args.temperature, enable_prefix_caching=caching), requests)
            on, off = (results[name], results["pagedllm"]) if caching else (results["pagedllm"], results[name])
            speedup = on["requests_per_s"] / off["requests_per_s"]
            results["prefix_caching_speedup"] = {"on_over_off_requests_per_s": speedup}
            print(f"prefix caching on / off: {speedup:.3f}x requests/s (hit rate {on['prefix_cache_hit_rate']:.1%})")
    if args.backend in ("hf", "both"):
        elapsed = run_hf(setup, requests, args.temperature, args.hf_batch_size or min(_HF_BATCH_SIZE, len(requests)))
        results["hf"] = _report("hf", elapsed, sum(r.output_len for r in requests), 0.0, requests)
    return finish("throughput", args, setup, results)


def _params(temperature: float, output_len: int) -> Any:
    from pagedllm import SamplingParams

    return SamplingParams(temperature=temperature, top_p=1.0, max_tokens=output_len, ignore_eos=True)


def run_pagedllm(setup: BenchSetup, requests: Sequence[BenchRequest], temperature: float, loras: Any = None,
                 **overrides: Any) -> tuple[float, int, float]:
    """Returns (elapsed seconds, output tokens generated, prefix-cache hit rate in prompt tokens); loras: a
    LoRARequest per request."""
    from pagedllm import LLM

    if setup.config.data_parallel_size > 1:
        return asyncio.run(_run_data_parallel(setup, requests, temperature, overrides))
    params = functools.partial(_params, temperature)
    llm = LLM(**(setup.llm_kwargs | overrides))
    warmup = requests[:_WARMUP_PROMPTS]
    llm.generate([_prompt(r) for r in warmup], [params(min(r.output_len, _WARMUP_TOKENS)) for r in warmup], use_tqdm=False,
                 lora_request=loras[: len(warmup)] if loras else None)
    llm.reset_prefix_cache()  # the timed run starts cold: its hits are its own
    before = llm.llm_engine.get_stats()
    start = time.perf_counter()  # generate returns host-side token ids, so the device is done when it returns
    outputs = llm.generate([_prompt(r) for r in requests], [params(r.output_len) for r in requests], use_tqdm=False,
                           lora_request=loras)
    elapsed = time.perf_counter() - start
    after = llm.llm_engine.get_stats()
    spec_decode_figures(llm)
    del llm
    release_memory(setup.config.device)
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hit_rate = (after.prefix_cache_hits - before.prefix_cache_hits) / queries if queries else 0.0
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outputs), hit_rate


async def _run_data_parallel(setup: BenchSetup, requests: Sequence[BenchRequest], temperature: float, overrides: dict[str, Any]) -> tuple[float, int, float]:
    """`--data-parallel-size K`: the replicas the server would run (one engine process each, requests to the
    least loaded), every request submitted at once; same figures as `run_pagedllm`."""
    from pagedllm.config import EngineConfig
    from pagedllm.engine.data_parallel import DPAsyncLLM

    front = DPAsyncLLM.create(EngineConfig.from_kwargs(**(setup.llm_kwargs | overrides)))
    front.start()
    ids = itertools.count()

    async def run(batch: Sequence[BenchRequest], max_tokens: int | None = None) -> int:
        async def one(r: BenchRequest) -> int:
            tokens = 0
            async for out in front.generate(f"bench-{next(ids)}", _prompt(r), _params(temperature, max_tokens or r.output_len)):
                tokens += len(out.outputs[0].token_ids)  # DELTA outputs
            return tokens

        return sum(await asyncio.gather(*(one(r) for r in batch)))

    try:
        await run(requests[: _WARMUP_PROMPTS * len(front.replicas)], _WARMUP_TOKENS)
        await front.reset_prefix_cache()
        before = front.stats
        start = time.perf_counter()
        output_tokens = await run(requests)
        elapsed = time.perf_counter() - start
        after = front.stats
    finally:
        await front.shutdown()
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hit_rate = (after.prefix_cache_hits - before.prefix_cache_hits) / queries if queries else 0.0
    return elapsed, output_tokens, hit_rate


def run_hf(setup: BenchSetup, requests: Sequence[BenchRequest], temperature: float, batch_size: int) -> float:
    import torch

    from pagedllm.benchmarks.hf_baseline import load_hf_model, pad_token_id, run_batches

    config = setup.config
    model = load_hf_model(config.model_path, config.hf_config, config.load_format, config.torch_dtype, config.device)
    pad = pad_token_id(config.hf_config)
    torch.manual_seed(config.seed)
    warmup = [BenchRequest(r.prompt_token_ids, min(r.output_len, _WARMUP_TOKENS)) for r in requests[:_WARMUP_PROMPTS]]
    run_batches(model, warmup, batch_size, temperature, pad)
    elapsed = run_batches(model, requests, batch_size, temperature, pad)
    del model
    release_memory(config.device)
    return elapsed


def _prompt(request: BenchRequest) -> dict[str, list[int]]:
    return {"prompt_token_ids": request.prompt_token_ids}


def _report(backend: str, elapsed: float, output_tokens: int, hit_rate: float, requests: Sequence[BenchRequest]) -> dict[str, Any]:
    expected = sum(r.output_len for r in requests)
    if output_tokens != expected:  # ignore_eos: anything else means requests ended early, and the figures would lie
        raise RuntimeError(f"{backend} generated {output_tokens} tokens, expected {expected}.")
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    figures = {
        "elapsed_s": elapsed,
        "num_requests": len(requests),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "requests_per_s": len(requests) / elapsed,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "prefix_cache_hit_rate": hit_rate,
    }
    print(
        f"[{backend:>8}] {len(requests)} requests in {elapsed:.2f} s: {figures['requests_per_s']:.2f} requests/s, "
        f"{figures['total_tokens_per_s']:.1f} total tokens/s, {figures['output_tokens_per_s']:.1f} output tokens/s"
        + (f", prefix-cache hit rate {hit_rate:.1%}" if hit_rate else "")
    )
    return figures


def _describe_workload(args: argparse.Namespace, requests: Sequence[BenchRequest]) -> str:
    name = f"workload {args.workload}: " if args.workload else ""
    shared = "shared" if args.num_prefixes == 1 else f"of {args.num_prefixes} prefixes"
    prefix = f"{args.prefix_len} {shared} + " if args.prefix_len else ""
    temp = "greedy" if args.temperature == 0 else f"temperature {args.temperature}"
    return (f"{name}{len(requests)} prompts, input {prefix}{args.input_len} tokens, output {args.output_len} tokens, {temp}, "
            f"backend {args.backend}")
