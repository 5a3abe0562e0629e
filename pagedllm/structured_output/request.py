"""One sample's constrained-decoding state: its grammar (compiling, then compiled), its own matcher, and whether the
model is still reasoning (the grammar starts matching after the reasoning end, e.g. `</think>`)."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


def _ends_with(ids: list[int], tail: list[int]) -> bool:
    return bool(tail) and len(ids) >= len(tail) and ids[-len(tail):] == tail


def _rfind(ids: list[int], seq: list[int]) -> int:
    """Start of the last occurrence of `seq` in `ids`, or -1."""
    if not seq:
        return -1
    n = len(seq)
    for i in range(len(ids) - n, -1, -1):
        if ids[i] == seq[0] and ids[i:i + n] == seq:
            return i
    return -1


def reasoning_ended(prompt_ids: list[int], start: list[int], end: list[int]) -> bool:
    """Whether a prompt leaves the model past its reasoning: an end after the last start (e.g. Qwen3's template with
    thinking off ends in `<think>\\n\\n</think>`). Otherwise the grammar waits for the end in the output."""
    return _rfind(prompt_ids, end) > _rfind(prompt_ids, start)


@dataclass(eq=False)
class StructuredOutputRequest:
    future: Future  # of the compiled grammar, shared by every request with the same key
    reasoning_end: list[int] | None = None  # token ids that end reasoning; None: no reasoning parser
    in_reasoning: bool = False  # the grammar is not applied until the output ends with reasoning_end
    matcher: Any = None  # created once the grammar is compiled
    ready: bool = False  # the scheduler admits the request only when ready
    error: BaseException | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Whether this step's token must follow the grammar."""
        return self.ready and not self.in_reasoning

    def accept(self, token: int, output_ids: list[int]) -> bool:
        """Feeds a sampled token (already appended to output_ids); False if the grammar rejects it."""
        if self.in_reasoning:
            if self.reasoning_end is not None and _ends_with(output_ids, self.reasoning_end):
                self.in_reasoning = False
            return True
        return bool(self.matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        return self.matcher is not None and not self.in_reasoning and self.matcher.is_terminated()

    def grammar_prefix(self, drafts: list[int]) -> list[int]:
        """The leading drafts the grammar allows from here (the matcher is left as it was)."""
        accepted = 0
        for token in drafts:
            if self.matcher.is_terminated() or not self.matcher.accept_token(token):
                break
            accepted += 1
        self.rollback(accepted)
        return drafts[:accepted]

    def rollback(self, num_tokens: int) -> None:
        """Undoes the last accepted tokens (rejected speculative tokens)."""
        if num_tokens and not self.in_reasoning:
            self.matcher.rollback(num_tokens)
