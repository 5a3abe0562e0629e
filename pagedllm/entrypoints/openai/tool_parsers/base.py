"""The tool-parser interface (`--tool-call-parser`), as vLLM's: a whole-output `extract_tool_calls`, and a per-choice
stream that turns text deltas into content deltas and tool-call deltas."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pagedllm.entrypoints.openai.protocol import DeltaToolCall, FunctionCall, ToolCall


@dataclass
class ExtractedToolCallInformation:
    tools_called: bool
    tool_calls: list[ToolCall] = field(default_factory=list)
    content: str | None = None


def make_call(name: Any, arguments: Any) -> ToolCall:
    """A ToolCall from parsed JSON; arguments may be an object or already JSON text."""
    if not isinstance(name, str) or not name:
        raise ValueError("a tool call needs a function name")
    if arguments is None:
        arguments = {}
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(function=FunctionCall(name=name, arguments=text))


def call_from_object(obj: Any) -> ToolCall:
    if not isinstance(obj, dict):
        raise ValueError("a tool call must be a JSON object")
    return make_call(obj.get("name"), obj.get("arguments", obj.get("parameters")))


class ToolStream:
    """One choice's streaming state: `feed` a text delta, get (content delta, tool-call deltas); `finish` at the end."""

    called: bool = False

    def feed(self, delta: str) -> tuple[str, list[DeltaToolCall]]:
        raise NotImplementedError

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        return "", []


class ToolParser:
    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer

    def extract_tool_calls(self, model_output: str) -> ExtractedToolCallInformation:
        raise NotImplementedError

    def stream(self) -> ToolStream:
        raise NotImplementedError
