"""Incremental reading of tool-call JSON as the model writes it: where a value ends (if it has), the top-level keys of
an object so far, and a streamer that turns a growing `{"name": ..., "arguments": {...}}` into OpenAI deltas: the
call's id, type and name once the name is complete, then the argument text in fragments as it arrives."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pagedllm.entrypoints.openai.protocol import DeltaFunctionCall, DeltaToolCall, random_id

_WS = " \t\r\n"
_CLOSE = {"{": "}", "[": "]"}


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def value_end(text: str, i: int) -> int | None:
    """The index just past the JSON value starting at text[i], or None if it is not complete yet."""
    if i >= len(text):
        return None
    first = text[i]
    if first == '"':
        j = i + 1
        while j < len(text):
            if text[j] == "\\":
                j += 2
                continue
            if text[j] == '"':
                return j + 1
            j += 1
        return None
    if first in _CLOSE:
        depth, j, in_string = 0, i, False
        while j < len(text):
            c = text[j]
            if in_string:
                if c == "\\":
                    j += 1
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i  # a number or a literal: complete only once something follows it
    while j < len(text) and text[j] not in ",}] \t\r\n":
        j += 1
    return j if j < len(text) else None


def top_level_keys(text: str) -> list[tuple[str, int, int | None]]:
    """(key, value start, value end or None) for the top-level members of an object whose text starts at text[0],
    as far as they have arrived; the last may be incomplete."""
    out: list[tuple[str, int, int | None]] = []
    i = skip_ws(text, 0)
    if i >= len(text) or text[i] != "{":
        return out
    i += 1
    while True:
        i = skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = skip_ws(text, i + 1)
        if i >= len(text) or text[i] != '"':
            return out
        key_end = value_end(text, i)
        if key_end is None:
            return out
        key = json.loads(text[i:key_end])
        i = skip_ws(text, key_end)
        if i >= len(text) or text[i] != ":":
            return out
        start = skip_ws(text, i + 1)
        if start >= len(text):
            return out
        end = value_end(text, start)
        out.append((key, start, end))
        if end is None:
            return out
        i = end


@dataclass
class CallStreamer:
    """One tool call's JSON object, fed its whole text so far each time; yields the deltas not sent yet."""

    index: int
    args_keys: tuple[str, ...] = ("arguments", "parameters")
    name: str | None = None
    sent_args: str = ""
    id: str = field(default_factory=lambda: random_id("chatcmpl-tool"))

    def update(self, text: str) -> list[DeltaToolCall]:
        out: list[DeltaToolCall] = []
        members = top_level_keys(text)
        if self.name is None:
            for key, start, end in members:
                if key == "name" and end is not None and text[start] == '"':
                    self.name = json.loads(text[start:end])
                    out.append(DeltaToolCall(index=self.index, id=self.id, type="function",
                                             function=DeltaFunctionCall(name=self.name, arguments="")))
        if self.name is not None:
            for key, start, end in members:
                if key in self.args_keys:
                    args = text[start:] if end is None else text[start:end]
                    if end is None:
                        args = args.rstrip(_WS)  # trailing whitespace may still turn out to lie outside the value
                    if len(args) > len(self.sent_args) and args.startswith(self.sent_args):
                        out.append(DeltaToolCall(index=self.index, function=DeltaFunctionCall(arguments=args[len(self.sent_args):])))
                        self.sent_args = args
                    break
        return out

    def finish(self, text: str) -> list[DeltaToolCall]:
        """The call's last deltas once its text is complete (arguments default to {} if it had none)."""
        out = self.update(text)
        if self.name is not None and not self.sent_args:
            out.append(DeltaToolCall(index=self.index, function=DeltaFunctionCall(arguments="{}")))
            self.sent_args = "{}"
        return out


class ObjectSequenceStream:
    """A run of JSON call objects separated by `separators` (e.g. `[{...}, {...}]` or `{...}; {...}`)."""

    def __init__(self, separators: str, args_keys: tuple[str, ...] = ("arguments", "parameters"), first_index: int = 0) -> None:
        self.separators = separators + _WS
        self.args_keys = args_keys
        self.text = ""
        self.pos = 0  # start of the object being read (or of what follows the last one)
        self.calls: list[CallStreamer] = []
        self.next_index = first_index

    @property
    def called(self) -> bool:
        return any(c.name is not None for c in self.calls)

    def feed(self, delta: str) -> list[DeltaToolCall]:
        self.text += delta
        out: list[DeltaToolCall] = []
        while True:
            i = self.pos
            while i < len(self.text) and self.text[i] in self.separators:
                i += 1
            if i >= len(self.text) or self.text[i] != "{":
                self.pos = i
                return out
            end = value_end(self.text, i)
            call = self._current()
            body = self.text[i:] if end is None else self.text[i:end]
            out += call.update(body) if end is None else call.finish(body)
            if end is None:
                self.pos = i
                return out
            self.pos = end
            self._open = None

    _open: CallStreamer | None = None

    def _current(self) -> CallStreamer:
        if self._open is None:
            self._open = CallStreamer(self.next_index, self.args_keys)
            self.calls.append(self._open)
            self.next_index += 1
        return self._open
