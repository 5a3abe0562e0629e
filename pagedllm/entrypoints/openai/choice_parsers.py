"""Per-choice parsing of a chat reply: first the reasoning (`<think>...</think>` -> reasoning_content), then tool calls
in what remains (a named function's arguments, a required call array, or the `--tool-call-parser` format). Streamed
and non-streamed replies both go through here, delta by delta, so they always agree."""

from __future__ import annotations

from typing import Any

from pagedllm.entrypoints.openai.protocol import AssistantMessage, DeltaMessage, DeltaToolCall, FunctionCall, ToolCall
from pagedllm.entrypoints.openai.reasoning import ReasoningParser, ReasoningStream
from pagedllm.entrypoints.openai.tool_parsers import NamedToolStream, RequiredToolStream, ToolParser, ToolStream


class ChoiceParsers:
    def __init__(self, reasoning: ReasoningParser | None, prompt: str | None, tool_mode: str,
                 tool_parser: ToolParser | None, named: str | None) -> None:
        self.reasoning, self.prompt = reasoning, prompt
        self.tool_mode, self.tool_parser, self.named = tool_mode, tool_parser, named
        self._streams: dict[int, tuple[ReasoningStream | None, ToolStream | None]] = {}

    def _tool_stream(self) -> ToolStream | None:
        if self.tool_mode == "named":
            assert self.named is not None
            return NamedToolStream(self.named)
        if self.tool_mode == "required":
            return RequiredToolStream()
        if self.tool_mode == "auto" and self.tool_parser is not None:
            return self.tool_parser.stream()
        return None

    def delta(self, index: int, text: str, final: bool) -> DeltaMessage:
        streams = self._streams.get(index)
        if streams is None:
            streams = self._streams[index] = (
                None if self.reasoning is None else self.reasoning.stream(self.prompt), self._tool_stream())
        reasoning_stream, tool_stream = streams
        reasoning, content = "", text
        if reasoning_stream is not None:
            reasoning, content = reasoning_stream.feed(text)
            if final:
                more_reasoning, more_content = reasoning_stream.finish()
                reasoning, content = reasoning + more_reasoning, content + more_content
        calls: list[DeltaToolCall] = []
        if tool_stream is not None:
            content, calls = tool_stream.feed(content)
            if final:
                more_content, more_calls = tool_stream.finish()
                content, calls = content + more_content, calls + more_calls
        return DeltaMessage(content=content or None, reasoning_content=reasoning or None, tool_calls=calls or None)

    def tool_calls_finish(self, index: int) -> bool:
        """finish_reason "tool_calls" (auto, required); a named function ends with "stop", as OpenAI's does."""
        tool_stream = self._streams.get(index, (None, None))[1]
        return self.tool_mode in ("auto", "required") and tool_stream is not None and tool_stream.called


def merge_delta(message: AssistantMessage, delta: DeltaMessage) -> None:
    """Adds a streamed delta to a whole message (tool calls by index: header once, then argument text)."""
    if delta.content:
        message.content = (message.content or "") + delta.content
    if delta.reasoning_content:
        message.reasoning_content = (message.reasoning_content or "") + delta.reasoning_content
    for piece in delta.tool_calls or []:
        while len(message.tool_calls) <= piece.index:
            message.tool_calls.append(ToolCall(function=FunctionCall(name="", arguments="")))
        call: Any = message.tool_calls[piece.index]
        if piece.id is not None:
            call.id = piece.id
        if piece.function.name:
            call.function.name = piece.function.name
        call.function.arguments += piece.function.arguments or ""
