"""Benchmark workloads: random-token requests, and the named workloads (W1, W2, L1, P1) the results cite.

Prompts are random token ids, so no dataset or tokenizer is needed and every run of a workload sees the
same requests: one `random.Random(seed)` draws, in this order, all input lengths, all output lengths,
the shared prefix (if any), then each prompt's tokens.
"""

from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# Model shapes bundled as config.json only, for `--load-format dummy` (random weights).
SHAPES = ("llama3-8b", "qwen3-0.6b", "llama3-70b", "llama3.1-405b", "llama3-8b-w8a8",  # W8A8: int8 layout
          "qwen3-30b-a3b", "mixtral-8x7b")  # mixture-of-experts shapes

Length = int | tuple[int, int]  # fixed, or uniform in [lo, hi] (inclusive)


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "throughput" | "latency"
    description: str
    model: str | None  # a bundled shape name (None: the bundled SmolLM2); `--model` overrides
    num_prompts: int
    input_len: Length
    output_len: Length
    temperature: float
    prefix_len: int = 0  # a random prefix shared by every prompt, before its own input_len tokens
    task: str | None = None  # "copy": real text instead of random tokens (copy_requests), for a real model


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("W1", "throughput", "Llama-3-8B shape, 1000 prompts x 512 in / 128 out, temperature 1.0",
                 "llama3-8b", 1000, 512, 128, 1.0),
        Workload("W2", "throughput", "Qwen3-0.6B shape, 256 prompts, in and out uniform in [100, 1024], temperature 0.6",
                 "qwen3-0.6b", 256, (100, 1024), (100, 1024), 0.6),
        Workload("L1", "latency", "one request 128 in / 256 out, greedy (--model llama3-8b | qwen3-0.6b)",
                 "llama3-8b", 1, 128, 256, 0.0),
        Workload("S1", "latency", "SmolLM2-135M (bundled, real weights) repeats or lightly edits a ~500-token passage "
                 "of the founding texts, greedy, 512 out (--batch-size 32 too): n-gram speculation's case",
                 None, 1, 500, 512, 0.0, task="copy"),
        Workload("P1", "throughput", "Llama-3-8B shape, 500 prompts = one shared 1024-token prefix + 64 unique, 64 out, greedy",
                 "llama3-8b", 500, 64, 64, 0.0, prefix_len=1024),
    )
}

# Defaults when neither a flag nor a workload sets a value.
_BASE: dict[str, dict[str, Any]] = {
    "throughput": dict(num_prompts=64, input_len=128, output_len=128, temperature=1.0, prefix_len=0),
    "latency": dict(batch_size=1, input_len=32, output_len=128, temperature=1.0),
}


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def shape_dir(name: str) -> str:
    return os.path.join(CONFIGS_DIR, name)


def apply_workload(args: argparse.Namespace, kind: str) -> Workload | None:
    """Fills unset (None) args from the named workload, then from the defaults: explicit flags win."""
    workload = WORKLOADS[args.workload] if args.workload else None
    if workload is not None and workload.kind != kind:
        raise ValueError(f"workload {workload.name} is a {workload.kind} workload; run it with `pagedllm bench {workload.kind}`.")
    from_workload: dict[str, Any] = {}
    if workload is not None:
        from_workload = dict(model=workload.model, input_len=workload.input_len, output_len=workload.output_len,
                             temperature=workload.temperature)
        from_workload["num_prompts" if kind == "throughput" else "batch_size"] = workload.num_prompts
        if kind == "throughput":
            from_workload["prefix_len"] = workload.prefix_len
    for name, value in {**_BASE[kind], **from_workload}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    # A bundled shape name stands for its config dir, with random weights unless told otherwise.
    is_shape = args.model in SHAPES
    if is_shape:
        args.model = shape_dir(args.model)
    if args.load_format is None:
        args.load_format = "dummy" if is_shape else "auto"
    return workload


def special_token_ids(model_path: str, hf_config: Any) -> set[int]:
    """BOS/EOS/PAD from the config, plus the tokenizer's special added tokens when the directory has a tokenizer."""
    ids: set[int] = set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(hf_config, name, None)
        ids.update([value] if isinstance(value, int) else value or [])
    if has_tokenizer(model_path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        ids.update(tokenizer.all_special_ids)
        ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def has_tokenizer(model_path: str) -> bool:
    return any(os.path.isfile(os.path.join(model_path, f)) for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def token_pool(vocab_size: int, special_ids: Iterable[int]) -> list[int]:
    """The ids a random prompt may use: the vocabulary without special tokens.

    Llama-3 and Qwen keep their special tokens (the reserved, unnamed ones too) in one block at the top of
    the vocabulary, so everything from the lowest special id in the upper half on is left out as well.
    """
    special = {i for i in special_ids if 0 <= i < vocab_size}
    top = min((i for i in special if i >= vocab_size // 2), default=vocab_size)
    return [i for i in range(top) if i not in special]


def make_requests(
    num_prompts: int, input_len: Length, output_len: Length, pool: Sequence[int], seed: int = 0, prefix_len: int = 0,
    num_prefixes: int = 1,
) -> list[BenchRequest]:
    """Random prompts; with prefix_len, request i starts with prefix i % num_prefixes."""
    rng = random.Random(seed)
    inputs = _lengths(rng, input_len, num_prompts)
    outputs = _lengths(rng, output_len, num_prompts)
    prefixes = [rng.choices(pool, k=prefix_len) for _ in range(num_prefixes)]
    return [BenchRequest(prefixes[i % num_prefixes] + rng.choices(pool, k=n_in), n_out)
            for i, (n_in, n_out) in enumerate(zip(inputs, outputs))]


_COPY_INSTRUCTIONS = ("Repeat the following passage exactly, word for word.",
                      "Copy the following passage, writing 'nation' wherever it says 'people'.",
                      "Rewrite the following passage in lower case, changing nothing else.",
                      "Copy the following passage and put each sentence on its own line.")


def copy_requests(tokenizer: Any, num_prompts: int, passage_len: int, output_len: int) -> list[BenchRequest]:
    """Chat prompts asking to repeat or lightly edit passages of ~passage_len tokens of the bundled founding texts
    (consecutive slices, cycled with the instructions above), the assistant's answer begun with the passage's first
    24 tokens (as a client prefilling the reply does): a 135M model then goes on copying rather than summarising."""
    from pagedllm.entrypoints.llm import render_chat

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "founding_texts.txt")
    with open(path) as f:
        text = " ".join(line.strip() for line in f if line.strip() and not line.startswith("#"))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    starts = range(0, len(ids) - passage_len + 1, passage_len)
    requests = []
    for i in range(num_prompts):
        instruction = _COPY_INSTRUCTIONS[(i // len(starts)) % len(_COPY_INSTRUCTIONS)]
        start = starts[i % len(starts)]
        passage, opening = tokenizer.decode(ids[start : start + passage_len]), tokenizer.decode(ids[start : start + 24])
        messages = [{"role": "user", "content": f"{instruction}\n\n{passage}"}, {"role": "assistant", "content": opening}]
        prompt = render_chat(tokenizer, messages, continue_final_message=True)
        requests.append(BenchRequest(prompt["prompt_token_ids"], output_len))
    return requests


def _lengths(rng: random.Random, length: Length, n: int) -> list[int]:
    if isinstance(length, int):  # fixed: draws nothing, so it does not shift the tokens
        values = [length] * n
    else:
        lo, hi = length
        values = [rng.randint(lo, hi) for _ in range(n)]
    if any(v < 1 for v in values):
        raise ValueError(f"lengths must be >= 1, got {length}.")
    return values
