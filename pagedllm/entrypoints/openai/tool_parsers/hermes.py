"""Hermes / Qwen2.5 / Qwen3: each call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, with any
content before the first."""

from __future__ import annotations

import json
import re

from pagedllm.entrypoints.openai.protocol import DeltaToolCall
from pagedllm.entrypoints.openai.reasoning.parsers import held_prefix
from pagedllm.entrypoints.openai.tool_parsers.base import (
    ExtractedToolCallInformation, ToolParser, ToolStream, call_from_object,
)
from pagedllm.entrypoints.openai.tool_parsers.json_stream import CallStreamer

START, END = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(START) + r"(.*?)(?:" + re.escape(END) + r"|$)", re.DOTALL)


class HermesToolParser(ToolParser):
    def extract_tool_calls(self, model_output: str) -> ExtractedToolCallInformation:
        if START not in model_output:
            return ExtractedToolCallInformation(False, content=model_output)
        try:
            calls = [call_from_object(json.loads(body)) for body in _CALL.findall(model_output) if body.strip()]
        except ValueError:  # not valid calls after all: the text is the answer
            return ExtractedToolCallInformation(False, content=model_output)
        content = model_output[: model_output.index(START)]
        return ExtractedToolCallInformation(bool(calls), calls, content if content.strip() else None)

    def stream(self) -> ToolStream:
        return _HermesStream()


class _HermesStream(ToolStream):
    def __init__(self) -> None:
        self.buffer = ""  # text not yet handed out (outside a call) or the current call's body (inside)
        self.call: CallStreamer | None = None
        self.num_calls = 0

    def feed(self, delta: str) -> tuple[str, list[DeltaToolCall]]:
        self.buffer += delta
        content, calls = [], []
        while True:
            if self.call is None:
                i = self.buffer.find(START)
                if i < 0:
                    keep = held_prefix(self.buffer, START)
                    self._content(content, self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    break
                self._content(content, self.buffer[:i])
                self.buffer = self.buffer[i + len(START):]
                self.call = CallStreamer(self.num_calls)
                self.num_calls += 1
            else:
                j = self.buffer.find(END)
                body = self.buffer if j < 0 else self.buffer[:j]
                body = body[: len(body) - held_prefix(body, END)] if j < 0 else body
                calls += self.call.update(body.lstrip()) if j < 0 else self.call.finish(body.strip())
                if j < 0:
                    break
                self.called = self.called or self.call.name is not None
                self.buffer, self.call = self.buffer[j + len(END):], None
        text = "".join(content)
        self.called = self.called or (self.call is not None and self.call.name is not None)
        return text, calls

    def _content(self, out: list[str], text: str) -> None:
        if not self.num_calls or text.strip():  # the newlines between and after calls are not content
            out.append(text)

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        if self.call is not None:  # cut off before </tool_call>: the call as far as it parses
            calls = self.call.finish(self.buffer.strip())
            self.buffer, self.call = "", None
            return "", calls
        rest, self.buffer = self.buffer, ""
        return ("" if self.num_calls and not rest.strip() else rest), []
