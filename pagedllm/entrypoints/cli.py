"""`pagedllm generate | chat | serve | bench | proxy`: the command line.

Engine flags are derived from `EngineConfig`'s fields (`max_num_seqs` -> `--max-num-seqs`), so the
CLI, `LLM(...)` and the config never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from pagedllm.config import EngineConfig

_INTERNAL_FIELDS = {"hf_config", "model_path", "model"}
_HELP = {
    "dtype": "auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16",
    "kv_cache_memory": "bytes for the KV cache (default: 4 GiB on CPU, --gpu-memory-utilization on CUDA)",
    "load_format": "auto | safetensors | dummy (random weights of the model's shape)",
    "quantization": "fp8: quantize a 16-bit checkpoint's weights at load; gptq, awq, compressed-tensors, gguf: the "
                    "checkpoint's format, read from its config.json without the flag (with --load-format dummy: random "
                    "weights quantized at load into that layout)",
    "kv_cache_dtype": "auto (the model's dtype) | fp8 | fp8_e4m3: the KV cache in float8, twice the blocks of bf16",
    "max_num_seqs": "most sequences in one step (default 512 on CUDA, 256 on CPU)",
    "max_num_batched_tokens": "token budget of one step (default 16384 on CUDA, 2048 on CPU)",
    "attention_backend": "auto | torch | triton",
    "async_scheduling": "overlap the CPU work of the next step with the device's run of this one (default: on for CUDA)",
    "tensor_parallel_size": "split every layer over N ranks (one process per device)",
    "pipeline_parallel_size": "split the layers into M contiguous stages, one per rank group",
    "data_parallel_size": "serve with K engine replicas (each with its own TP x PP world), requests balanced by load",
    "disable_custom_all_reduce": "NCCL for every tensor-parallel all-reduce (default: small ones go one-shot through NVLink symmetric memory)",
    "reasoning_parser": "qwen3 | deepseek_r1: the model reasons in <think>...</think> (reasoning_content; grammars apply after it)",
    "distributed_executor_backend": "how ranks 1.. of a parallel engine start: mp (default) | ray (actors on a Ray cluster)",
    "speculative_config": "speculative decoding, as JSON: '{\"method\": \"ngram\", \"num_speculative_tokens\": 3}' "
                          "(prompt_lookup_min/max) or '{\"method\": \"draft_model\", \"model\": PATH, "
                          "\"num_speculative_tokens\": 3}'",
    "runner": "auto | generate | pooling (embeddings: LLM.embed, /v1/embeddings); auto: pooling for a "
              "sentence-transformers directory (modules.json)",
    "pooler_config": "pooling models, as JSON: '{\"pooling_type\": \"LAST\" | \"MEAN\" | \"CLS\", \"normalize\": true}' "
                     "(default: from the model's sentence-transformers files, else LAST, normalized)",
    "limit_mm_per_prompt": 'most items of each modality per prompt, as JSON: \'{"image": 2}\' (default: no limit)',
    "mm_processor_kwargs": 'image processor settings over the checkpoint\'s, as JSON: \'{"max_pixels": 802816}\' '
                           '(Qwen2-VL: min_pixels / max_pixels)',
    "allowed_local_media_path": "serve file:// media URLs from inside this directory (real paths; default: none)",
    "allowed_media_domains": "fetch http(s) media only from these hosts, comma-separated (default: any public host)",
    "enable_expert_parallel": "MoE models: each tensor-parallel rank holds E/N whole experts instead of a slice of "
                              "every expert (E must divide by N); the same one all-reduce per block",
}


def add_engine_args(parser: argparse.ArgumentParser, model_positional: bool = False) -> None:
    model_help = "Hugging Face directory or .gguf file (default: the bundled SmolLM2-135M-Instruct)"
    if model_positional:
        parser.add_argument("model", nargs="?", default=None, help=model_help)
    else:
        parser.add_argument("--model", default=None, help=model_help)
    group = parser.add_argument_group("engine")
    for field in dataclasses.fields(EngineConfig):
        if field.name in _INTERNAL_FIELDS:
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool | None":  # tri-state: --x, --no-x, or neither (auto)
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None, help=_HELP.get(field.name))
            continue
        if field.type in ("bool", bool):
            if field.default:  # on by default: --x and --no-x, as vLLM does
                group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=True, help=_HELP.get(field.name))
            else:
                group.add_argument(flag, dest=field.name, action="store_true", help=_HELP.get(field.name))
            continue
        kind = int if "int" in str(field.type) else float if "float" in str(field.type) else str
        group.add_argument(flag, dest=field.name, type=kind, default=field.default, help=_HELP.get(field.name))


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(EngineConfig)} - (_INTERNAL_FIELDS - {"model"})
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default here)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace) -> Any:
    from pagedllm.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.sampling_seed, stop=args.stop,
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from pagedllm import LLM

    llm = LLM(**engine_kwargs(args))
    prompts = args.prompt or ["The capital of France is"]
    for prompt, output in zip(prompts, llm.generate(prompts, sampling_params(args), use_tqdm=len(prompts) > 1)):
        if len(prompts) > 1:
            print(f"--- {prompt!r}")
        print(prompt + output.outputs[0].text)


def cmd_chat(args: argparse.Namespace) -> None:
    from pagedllm.entrypoints.chat import run_chat

    run_chat(engine_kwargs(args), sampling_params(args), args.system)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pagedllm", description="Paged-KV-cache LLM inference engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete prompts and print the results")
    gen.add_argument("prompt", nargs="*", help="prompt text (default: 'The capital of France is')")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with the model's chat template")
    chat.add_argument("--system", default=None, help="system message")
    add_engine_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    _add_optional_commands(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def _add_optional_commands(sub: Any) -> None:
    """`serve` and `bench` live in their own modules; each adds its parser."""
    from pagedllm.benchmarks.cli import add_bench_parser
    from pagedllm.entrypoints.openai.cli import add_serve_parser

    add_serve_parser(sub)
    add_bench_parser(sub)
    _add_proxy_parser(sub)


def _add_proxy_parser(sub: Any) -> None:
    proxy = sub.add_parser("proxy", help="disaggregated prefill: an OpenAI-compatible front for prefill and decode "
                                         "instances (pagedllm serve --kv-transfer-config ...)")
    proxy.add_argument("--prefill", nargs="+", required=True, metavar="URL",
                       help="prefill instances (kv_role kv_producer), e.g. http://10.0.0.1:8100")
    proxy.add_argument("--decode", nargs="+", required=True, metavar="URL", help="decode instances (kv_role kv_consumer)")
    proxy.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    proxy.add_argument("--port", type=int, default=8000)
    proxy.add_argument("--prefill-timeout", type=float, default=300.0,
                       help="seconds a prefill may take before the decode instance prefills the request itself")
    proxy.add_argument("--uvicorn-log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug", "trace"])
    proxy.set_defaults(func=_run_proxy)


def _run_proxy(args: argparse.Namespace) -> None:
    from pagedllm.entrypoints.proxy import run_proxy  # web stack imported only when proxying

    run_proxy(args)


if __name__ == "__main__":
    main()
