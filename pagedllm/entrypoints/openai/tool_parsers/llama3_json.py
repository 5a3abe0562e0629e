"""Llama 3.x JSON tool calls: the reply is `{"name": ..., "parameters": {...}}` (several separated by `;`), optionally
after `<|python_tag|>`; a reply that does not start with `{` is content."""

from __future__ import annotations

import json

from pagedllm.entrypoints.openai.protocol import DeltaToolCall
from pagedllm.entrypoints.openai.tool_parsers.base import (
    ExtractedToolCallInformation, ToolParser, ToolStream, call_from_object,
)
from pagedllm.entrypoints.openai.tool_parsers.json_stream import ObjectSequenceStream

PYTHON_TAG = "<|python_tag|>"


def _strip(text: str) -> str:
    text = text.lstrip()
    return text[len(PYTHON_TAG):].lstrip() if text.startswith(PYTHON_TAG) else text


class Llama3JsonToolParser(ToolParser):
    def extract_tool_calls(self, model_output: str) -> ExtractedToolCallInformation:
        text = _strip(model_output)
        if not text.startswith("{"):
            return ExtractedToolCallInformation(False, content=model_output)
        decoder, calls, i = json.JSONDecoder(), [], 0
        try:
            while i < len(text):
                obj, i = decoder.raw_decode(text, i)
                calls.append(call_from_object(obj))
                while i < len(text) and text[i] in " \t\r\n;,":
                    i += 1
        except ValueError:
            return ExtractedToolCallInformation(False, content=model_output)
        return ExtractedToolCallInformation(bool(calls), calls, None)

    def stream(self) -> ToolStream:
        return _Llama3Stream()


class _Llama3Stream(ToolStream):
    def __init__(self) -> None:
        self.head = ""  # text until it is known whether the reply is a call
        self.mode: str | None = None  # "calls" | "content"
        self.calls = ObjectSequenceStream(";,")

    def feed(self, delta: str) -> tuple[str, list[DeltaToolCall]]:
        if self.mode is None:
            self.head += delta
            text = self.head.lstrip()
            if not text or (PYTHON_TAG.startswith(text) and text != PYTHON_TAG):
                return "", []
            self.mode = "calls" if _strip(text).startswith("{") or text.startswith(PYTHON_TAG) else "content"
            delta, self.head = (_strip(text) if self.mode == "calls" else self.head), ""
        if self.mode == "content":
            return delta, []
        out = self.calls.feed(delta)
        self.called = self.calls.called
        return "", out

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        rest, self.head = self.head, ""
        return (rest if self.mode != "calls" else ""), []
