"""Scoring (query, document) pairs, as vLLM's `LLM.score` and `/v1/score` / `/rerank`: a cross-encoder (a one-label
classifier) reads each pair as one prompt, the tokenizer's text-pair encoding with its segment ids; an embedder
embeds both sides and scores their cosine similarity."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def score_pairs(data_1: str | Sequence[str], data_2: str | Sequence[str]) -> list[tuple[str, str]]:
    """One text against many (either side), or two lists pairwise."""
    first = [data_1] if isinstance(data_1, str) else list(data_1)
    second = [data_2] if isinstance(data_2, str) else list(data_2)
    if len(first) == 1 and len(second) != 1:
        first = first * len(second)
    elif len(second) == 1 and len(first) != 1:
        second = second * len(first)
    if len(first) != len(second):
        raise ValueError(f"score takes one text against many or two lists of one length; got {len(first)} and "
                         f"{len(second)}.")
    if not first:
        raise ValueError("score needs at least one pair of texts.")
    if not all(isinstance(t, str) for t in first + second):
        raise ValueError("score takes texts (strings).")
    return list(zip(first, second))


def pair_prompt(tokenizer: Any, text_1: str, text_2: str, truncate_prompt_tokens: int | None = None) -> dict[str, Any]:
    """A cross-encoder's prompt for one pair: the tokenizer's pair encoding ([CLS] a [SEP] b [SEP] for BERT), with
    token_type_ids where the tokenizer gives them; truncated (longest side first) only when asked."""
    if tokenizer is None:
        raise ValueError("scoring texts needs a tokenizer; this engine was started with skip_tokenizer_init=True.")
    truncate = truncate_prompt_tokens is not None
    encoded = tokenizer(text_1, text_2, truncation=truncate or False, max_length=truncate_prompt_tokens if truncate else None)
    prompt = {"prompt_token_ids": list(encoded["input_ids"])}
    if "token_type_ids" in encoded:
        prompt["token_type_ids"] = list(encoded["token_type_ids"])
    return prompt


def cosine(a: list[float], b: list[float]) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=0))
