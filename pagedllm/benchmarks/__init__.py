"""`pagedllm bench throughput | latency | serve`: offline speed of this engine, and of transformers' `generate`
on the same workload in the same process (`--backend hf|both`), so the two are compared like for like.

Shared plumbing of the throughput and latency benchmarks lives here; heavy imports stay inside functions so
building the CLI parser stays cheap.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
from dataclasses import dataclass
from typing import Any

from pagedllm.benchmarks.workloads import Workload, apply_workload, has_tokenizer, special_token_ids, token_pool

BACKENDS = ("pagedllm", "hf", "both")


@dataclass
class BenchSetup:
    workload: Workload | None
    config: Any  # the finalized EngineConfig: model path, device and dtype the run uses
    llm_kwargs: dict[str, Any]
    token_pool: list[int]
    environment: dict[str, Any]


def prepare(args: argparse.Namespace, kind: str) -> BenchSetup:
    """Resolves the workload, the model, the device and the dtype, without loading any weights."""
    from pagedllm.config import EngineConfig
    from pagedllm.entrypoints.cli import engine_kwargs

    workload = apply_workload(args, kind)
    kwargs = engine_kwargs(args)
    config = EngineConfig.from_kwargs(**kwargs)
    config.finalize()
    kwargs["model"] = config.model_path  # resolved once (a .gguf is converted once)
    # Prompts are token ids, so a config-only directory needs no tokenizer; with one, outputs are
    # detokenized as a server would.
    if not kwargs["skip_tokenizer_init"] and kwargs["tokenizer"] is None and not has_tokenizer(config.model_path):
        kwargs["skip_tokenizer_init"] = True
    pool = token_pool(config.hf_config.vocab_size, special_token_ids(config.model_path, config.hf_config))
    env = environment(config.device, config.dtype)
    env.update(model=config.model_path, load_format=config.load_format, detokenize=not kwargs["skip_tokenizer_init"],
               async_scheduling=config.async_scheduling)
    return BenchSetup(workload, config, kwargs, pool, env)


def environment(device: str, dtype: str) -> dict[str, Any]:
    import torch
    import transformers

    import pagedllm

    on_cuda = device.startswith("cuda")
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if on_cuda else _cpu_name(),
        "dtype": dtype,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda if on_cuda else None,
        "pagedllm": pagedllm.__version__,
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def describe(setup: BenchSetup) -> str:
    env = setup.environment
    return (
        f"device: {env['device']} ({env['device_name']}), dtype: {env['dtype']}, model: {env['model']} "
        f"(load_format {env['load_format']}), torch {env['torch']}, transformers {env['transformers']}, "
        f"async scheduling {'on' if env.get('async_scheduling') else 'off'}"
    )


def spec_decode_figures(llm: Any) -> dict[str, Any] | None:
    """With speculative decoding on: its counters so far (printed), for the JSON results; else None."""
    stats = llm.llm_engine.get_stats().spec_decode
    if stats is None:
        return None
    figures = {"num_drafts": stats.num_drafts, "num_draft_tokens": stats.num_draft_tokens,
               "num_accepted_tokens": stats.num_accepted_tokens, "accepted_per_pos": stats.accepted_per_pos,
               "acceptance_rate": stats.acceptance_rate, "mean_acceptance_length": stats.mean_acceptance_length}
    print(f"speculative decoding: {stats.num_drafts} drafts, {stats.num_accepted_tokens} / {stats.num_draft_tokens} draft "
          f"tokens accepted ({stats.acceptance_rate:.1%}), mean acceptance length {stats.mean_acceptance_length:.2f}, "
          f"accepted per position {stats.accepted_per_pos}")
    return figures


def synchronize(device: str) -> None:
    """Timers read after this see finished GPU work, not just queued kernels."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def release_memory(device: str) -> None:
    """Hands the dropped backend's memory (KV cache, weights) back, so the next backend can use it."""
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def write_json(path: str, args: argparse.Namespace, payload: dict[str, Any]) -> None:
    plain_args = {k: v for k, v in vars(args).items() if not callable(v)}
    with open(path, "w") as f:
        json.dump({**payload, "args": plain_args}, f, indent=2, default=str)
        f.write("\n")


def finish(benchmark: str, args: argparse.Namespace, setup: BenchSetup, results: dict[str, dict[str, Any]], ratio_note: str = "") -> dict[str, Any]:
    """The run's payload: figures per backend, the ours/hf ratio when both ran, written to --output-json."""
    payload: dict[str, Any] = {"benchmark": benchmark, "workload": args.workload, "environment": setup.environment, "results": results}
    if "hf" in results and "pagedllm" in results:
        ratio = results["pagedllm"]["output_tokens_per_s"] / results["hf"]["output_tokens_per_s"]
        payload["ratio_pagedllm_over_hf"] = ratio
        print(f"pagedllm / hf: {ratio:.2f}x output tokens/s{ratio_note}")
    if args.output_json:
        write_json(args.output_json, args, payload)
    return payload
