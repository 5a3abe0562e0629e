"""Tool-call and reasoning parsers against recorded model outputs, whole and streamed in awkward chunk splits (tags
split across chunks, JSON arguments split mid-string): the streamed deltas must add up to the whole-output parse."""

from __future__ import annotations

import json

import pytest

from pagedllm.entrypoints.openai.reasoning import get_reasoning_parser
from pagedllm.entrypoints.openai.tool_parsers import NamedToolStream, RequiredToolStream, ToolStream, get_tool_parser

# Recorded outputs (Qwen2.5-7B-Instruct with hermes, Llama-3.1-8B-Instruct with llama3_json).
HERMES_ONE = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris, France", "unit": "celsius"}}\n</tool_call>'
HERMES_TWO = ('Let me check both cities.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Berlin", "fmt": "%H:%M \\"24h\\""}}\n</tool_call>')
HERMES_NONE = "The weather in Paris is usually mild in spring."
LLAMA_ONE = '{"name": "get_weather", "parameters": {"city": "San Francisco", "days": 3}}'
LLAMA_TAGGED = '<|python_tag|>{"name": "search", "parameters": {"query": "pagedllm {braces} \\u00e9"}}; {"name": "noop", "parameters": {}}'
LLAMA_NONE = "I can't call a tool for that, but here is the answer: 42."


def _splits(text: str) -> list[list[str]]:
    """Whole, one char at a time, and fixed sizes that cut tags and strings at many points."""
    out = [[text], list(text)]
    for size in (2, 3, 5, 7, 11):
        out.append([text[i:i + size] for i in range(0, len(text), size)])
    return out


def _run(stream: ToolStream, chunks: list[str]) -> tuple[str, list[dict]]:
    content, calls = "", {}
    for chunk in chunks + [None]:
        text, deltas = stream.finish() if chunk is None else stream.feed(chunk)
        content += text
        for d in deltas:
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id is not None:
                assert call["id"] is None and d.type == "function" and d.function.name  # the header comes once, first
                call["id"], call["name"] = d.id, d.function.name
            else:
                assert call["id"] is not None  # argument pieces only after the header
            call["arguments"] += d.function.arguments or ""
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("parser_name, output, expected_content, expected_calls", [
    ("hermes", HERMES_ONE, None, [("get_weather", {"city": "Paris, France", "unit": "celsius"})]),
    ("hermes", HERMES_TWO, "Let me check both cities.\n",
     [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Berlin", "fmt": '%H:%M "24h"'})]),
    ("hermes", HERMES_NONE, HERMES_NONE, []),
    ("llama3_json", LLAMA_ONE, None, [("get_weather", {"city": "San Francisco", "days": 3})]),
    ("llama3_json", LLAMA_TAGGED, None, [("search", {"query": "pagedllm {braces} \u00e9"}), ("noop", {})]),
    ("llama3_json", LLAMA_NONE, LLAMA_NONE, []),
])
def test_tool_parsers(parser_name: str, output: str, expected_content: str | None, expected_calls: list) -> None:
    parser = get_tool_parser(parser_name)()
    info = parser.extract_tool_calls(output)
    assert info.tools_called == bool(expected_calls) and info.content == expected_content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in info.tool_calls] == expected_calls
    for chunks in _splits(output):
        stream = parser.stream()
        content, calls = _run(stream, chunks)
        assert (content or None) == expected_content, chunks[:3]
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == expected_calls, chunks[:3]
        assert stream.called == bool(expected_calls)


def test_hermes_partial_tag_that_is_not_a_tag() -> None:
    content, calls = _run(get_tool_parser("hermes")().stream(), ["Use <tool", "s> wisely <", "b>"])
    assert content == "Use <tools> wisely <b>" and not calls


def test_forced_streams() -> None:
    args = '{"city": "Paris", "when": {"day": "mon"}}'
    for chunks in _splits(args):
        content, calls = _run(NamedToolStream("get_weather"), chunks)
        assert not content and calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == json.loads(args)
    required = '[{"name": "a", "parameters": {"x": [1, 2, {"y": "}]"}]}}, {"name": "b", "parameters": {}}]'
    for chunks in _splits(required):
        _, calls = _run(RequiredToolStream(), chunks)
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("a", {"x": [1, 2, {"y": "}]"}]}), ("b", {})]


QWEN3_THINK = "<think>\nThe user wants JSON. I'll answer {\"a\": 1}.\n</think>\n\n{\"a\": 1}"
QWEN3_PLAIN = "Hello! How can I help?"
QWEN3_TRUNCATED = "<think>\nStill thinking about </thi"
R1_NO_START = "The prompt opened the block.\n</think>\nAnswer: 4"


@pytest.mark.parametrize("name, output, prompt, reasoning, content", [
    ("qwen3", QWEN3_THINK, None, "\nThe user wants JSON. I'll answer {\"a\": 1}.\n", "\n\n{\"a\": 1}"),
    ("qwen3", QWEN3_PLAIN, None, None, QWEN3_PLAIN),
    ("qwen3", QWEN3_TRUNCATED, None, "\nStill thinking about </thi", None),
    ("qwen3", "Short.\n</think>\n\nDone", "<|im_start|>assistant\n<think>\n", "Short.\n", "\n\nDone"),
    ("qwen3", "{\"a\": 1}", "<think>\n\n</think>\n\n", None, "{\"a\": 1}"),
    ("deepseek_r1", R1_NO_START, None, "The prompt opened the block.\n", "\nAnswer: 4"),
    ("deepseek_r1", "<think>x</think>y", None, "x", "y"),
    ("deepseek_r1", "sunny", "<think>ok</think>", None, "sunny"),  # the prompt closed the block: all content
])
def test_reasoning_parsers(name: str, output: str, prompt: str | None, reasoning: str | None, content: str | None) -> None:
    parser = get_reasoning_parser(name)()
    assert parser.extract_reasoning(output, prompt) == (reasoning, content)
    for chunks in _splits(output):
        stream = parser.stream(prompt)
        r, c = "", ""
        for chunk in chunks:
            dr, dc = stream.feed(chunk)
            r, c = r + dr, c + dc
        dr, dc = stream.finish()
        assert ((r + dr) or None, (c + dc) or None) == (reasoning, content), chunks[:3]
