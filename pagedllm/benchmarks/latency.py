"""`pagedllm bench latency`: one batch (default: a single request) from submission to its last token,
repeated; the median iteration is the figure, as one stream's speed is what a user waits on."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any, Callable, Sequence

from pagedllm.benchmarks import lora as bench_lora
from pagedllm.benchmarks import BenchSetup, describe, finish, prepare, release_memory, spec_decode_figures, synchronize
from pagedllm.benchmarks.workloads import BenchRequest, copy_requests, make_requests


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=None, help="requests run together in each iteration (default 1)")
    parser.add_argument("--num-iters", type=int, default=3, help="timed iterations; the median is reported")
    parser.add_argument("--num-iters-warmup", type=int, default=1, help="untimed iterations first, per backend")
    bench_lora.add_arguments(parser)


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.num_iters < 1 or args.num_iters_warmup < 0:
        raise ValueError("--num-iters must be >= 1 and --num-iters-warmup >= 0.")
    setup = prepare(args, "latency")
    if setup.workload is not None and setup.workload.task == "copy":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(setup.config.tokenizer or setup.config.model_path)
        requests = copy_requests(tokenizer, args.batch_size, args.input_len, args.output_len)
    else:
        requests = make_requests(args.batch_size, args.input_len, args.output_len, setup.token_pool, args.seed)
    print(describe(setup))
    temp = "greedy" if args.temperature == 0 else f"temperature {args.temperature}"
    name = f"workload {args.workload}: " if args.workload else ""
    print(f"{name}batch {args.batch_size}, input {args.input_len} tokens, output {args.output_len} tokens, {temp}, "
          f"{args.num_iters} iterations, backend {args.backend}")
    results: dict[str, dict[str, Any]] = {}
    if args.backend in ("pagedllm", "both"):
        if setup.config.speculative_config is not None:  # speculation off first, on the same requests, for the ratio
            off = dataclasses.replace(setup, llm_kwargs={**setup.llm_kwargs, "speculative_config": None})
            results["pagedllm-no-spec"] = _report("no spec", _time_pagedllm(off, requests, args), requests)
        lora = None
        if args.num_loras:  # the base model alone first, then one adapter for the batch
            results["pagedllm-no-lora"] = _report("no lora", _time_pagedllm(setup, requests, args), requests)
            lora = bench_lora.random_adapters(setup.config.hf_config, args.num_loras, args.lora_rank)[0]
            lora_kwargs = bench_lora.engine_overrides(args.num_loras, args.lora_rank)
            setup = dataclasses.replace(setup, llm_kwargs={**setup.llm_kwargs, **lora_kwargs})
        results["pagedllm"] = _report("pagedllm", _time_pagedllm(setup, requests, args, lora), requests)
        if lora is not None:
            ratio = results["pagedllm"]["output_tokens_per_s"] / results["pagedllm-no-lora"]["output_tokens_per_s"]
            results["pagedllm"]["ratio_over_no_lora"] = ratio
            print(f"one LoRA adapter of rank {args.lora_rank} / base model: {ratio:.3f}x output tokens/s")
        if "pagedllm-no-spec" in results:
            ratio = results["pagedllm"]["output_tokens_per_s"] / results["pagedllm-no-spec"]["output_tokens_per_s"]
            results["pagedllm"]["speedup_over_no_spec"] = ratio
            print(f"speculative decoding / off: {ratio:.2f}x output tokens/s")
    if args.backend in ("hf", "both"):
        results["hf"] = _report("hf", _time_hf(setup, requests, args), requests)
    return finish("latency", args, setup, results, ' (hf median latency / ours)')


def _iterate(run: Callable[[], None], args: argparse.Namespace, device: str) -> list[float]:
    """Warm-up iterations, then the timed ones; returns each timed iteration's seconds."""
    for _ in range(args.num_iters_warmup):
        run()
    latencies = []
    for _ in range(args.num_iters):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        latencies.append(time.perf_counter() - start)
    return latencies


def _time_pagedllm(setup: BenchSetup, requests: Sequence[BenchRequest], args: argparse.Namespace,
                   lora: Any = None) -> list[float]:
    from pagedllm import LLM, SamplingParams

    llm = LLM(**setup.llm_kwargs)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=args.temperature, top_p=1.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]

    def run() -> None:
        llm.reset_prefix_cache()  # every iteration prefills its prompt, as the first one did
        outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        if generated != sum(r.output_len for r in requests):
            raise RuntimeError(f"pagedllm generated {generated} tokens, expected {sum(r.output_len for r in requests)}.")

    latencies = _iterate(run, args, setup.config.device)
    setup.environment["spec_decode"] = spec_decode_figures(llm) or setup.environment.get("spec_decode")
    del llm
    release_memory(setup.config.device)
    return latencies


def _time_hf(setup: BenchSetup, requests: Sequence[BenchRequest], args: argparse.Namespace) -> list[float]:
    import torch

    from pagedllm.benchmarks.hf_baseline import generate_batch, load_hf_model, pad_token_id

    config = setup.config
    model = load_hf_model(config.model_path, config.hf_config, config.load_format, config.torch_dtype, config.device)
    pad = pad_token_id(config.hf_config)
    torch.manual_seed(config.seed)
    latencies = _iterate(lambda: generate_batch(model, requests, args.temperature, pad), args, config.device)
    del model
    release_memory(config.device)
    return latencies


def _report(backend: str, latencies: list[float], requests: Sequence[BenchRequest]) -> dict[str, Any]:
    median = statistics.median(latencies)
    output_tokens = sum(r.output_len for r in requests)
    figures = {
        "latencies_s": latencies,
        "median_latency_s": median,
        "min_latency_s": min(latencies),
        "max_latency_s": max(latencies),
        "s_per_request": median,  # the batch's requests run together: each takes the whole iteration
        "s_per_output_token": median / max(r.output_len for r in requests),
        "output_tokens_per_s": output_tokens / median,
    }
    print(
        f"[{backend:>8}] median {median:.3f} s per request (min {min(latencies):.3f}, max {max(latencies):.3f}), "
        f"{figures['output_tokens_per_s']:.1f} output tokens/s, {1000 * figures['s_per_output_token']:.2f} ms per output token"
    )
    return figures
