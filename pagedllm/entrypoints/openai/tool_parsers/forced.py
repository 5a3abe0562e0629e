"""Streams for the tool_choice modes that a JSON-schema constraint enforces: a named function (the output is its
arguments) and required (the output is a JSON array of {"name", "parameters"})."""

from __future__ import annotations

from pagedllm.entrypoints.openai.protocol import DeltaFunctionCall, DeltaToolCall, random_id
from pagedllm.entrypoints.openai.tool_parsers.base import ToolStream
from pagedllm.entrypoints.openai.tool_parsers.json_stream import ObjectSequenceStream


class NamedToolStream(ToolStream):
    def __init__(self, name: str) -> None:
        self.name = name
        self.started = False

    def feed(self, delta: str) -> tuple[str, list[DeltaToolCall]]:
        out = []
        if not self.started:
            self.started = self.called = True
            out.append(DeltaToolCall(index=0, id=random_id("chatcmpl-tool"), type="function",
                                     function=DeltaFunctionCall(name=self.name, arguments="")))
        if delta:
            out.append(DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=delta)))
        return "", out


class RequiredToolStream(ToolStream):
    def __init__(self) -> None:
        self.calls = ObjectSequenceStream("[,]", args_keys=("parameters", "arguments"))

    def feed(self, delta: str) -> tuple[str, list[DeltaToolCall]]:
        out = self.calls.feed(delta)
        self.called = self.calls.called
        return "", out
