"""Reasoning parsers (`--reasoning-parser`): split a thinking model's output into `reasoning_content` (inside
`<think>...</think>`) and `content`. Non-streamed text goes through the same incremental splitter as streamed deltas,
so both always agree whatever the chunking."""

from pagedllm.entrypoints.openai.reasoning.parsers import (
    DeepSeekR1ReasoningParser, Qwen3ReasoningParser, ReasoningParser, ReasoningStream, get_reasoning_parser,
    REASONING_PARSERS,
)

__all__ = ["DeepSeekR1ReasoningParser", "Qwen3ReasoningParser", "ReasoningParser", "ReasoningStream",
           "get_reasoning_parser", "REASONING_PARSERS"]
