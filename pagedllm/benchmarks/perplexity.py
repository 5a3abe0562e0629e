"""`pagedllm bench perplexity`: a model's perplexity on a text through the engine itself (`prompt_logprobs`), so
quantized weights (--quantization fp8) and KV caches (--kv-cache-dtype fp8) are measured as they serve.

The text (default: bundled public-domain English, ~2.9k SmolLM2 tokens) is cut into windows of --window tokens, each
scored as one prompt from its own start (no overlap): perplexity = exp(mean negative log-likelihood of every token
but each window's first)."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

DEFAULT_TEXT = os.path.join(os.path.dirname(__file__), "data", "founding_texts.txt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", default=DEFAULT_TEXT, help="a UTF-8 text file ('#' lines skipped); default: bundled")
    parser.add_argument("--window", type=int, default=1024, help="tokens per scored window (capped by max_model_len - 1)")
    parser.add_argument("--max-text-tokens", type=int, default=None, help="score only the text's first N tokens")
    parser.add_argument("--output-json", default=None, metavar="PATH", help="write the figures and args here")


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return "".join(line for line in f if not line.startswith("#"))


def main(args: argparse.Namespace) -> dict[str, Any]:
    from pagedllm import LLM, SamplingParams
    from pagedllm.entrypoints.cli import engine_kwargs

    kwargs = {k: v for k, v in engine_kwargs(args).items() if v is not None}
    kwargs["skip_tokenizer_init"] = False  # the text must be tokenized
    llm = LLM(**kwargs)
    engine = llm.llm_engine
    ids = engine.tokenizer(read_text(args.text), add_special_tokens=False).input_ids[: args.max_text_tokens]
    window = max(2, min(args.window, engine.config.max_model_len - 1))  # room for the one sampled token
    windows = [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]
    if not windows:
        raise ValueError("The text has fewer than 2 tokens to score.")
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    nll, count = 0.0, 0
    for w, out in zip(windows, outputs):
        assert out.prompt_logprobs is not None
        for token, entry in zip(w[1:], out.prompt_logprobs[1:]):
            nll -= entry[token].logprob
            count += 1
    config = engine.config
    result = {
        "perplexity": math.exp(nll / count), "tokens_scored": count, "windows": len(windows), "window": window,
        "model": config.model_path, "dtype": config.dtype, "device": config.device, "quantization": config.quantization,
        "kv_cache_dtype": config.kv_cache_dtype, "seconds": time.perf_counter() - start,
    }
    print(f"perplexity {result['perplexity']:.4f} over {count} tokens ({len(windows)} windows of <= {window}); "
          f"{config.dtype}, quantization={config.quantization}, kv_cache_dtype={config.kv_cache_dtype}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({**result, "args": {k: v for k, v in vars(args).items() if k != "func"}}, f, indent=2)
    return result
