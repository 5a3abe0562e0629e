"""`<think>...</think>` splitting for Qwen3 and DeepSeek-R1 style models."""

from __future__ import annotations

from typing import Any


def held_prefix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag` (to hold back until the next chunk)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningStream:
    """Splits one choice's text, fed in any chunks, into (reasoning delta, content delta) pairs."""

    def __init__(self, start: str, end: str, starts_in_reasoning: bool) -> None:
        self.start, self.end = start, end
        self.state = "start"  # start: before any text decides | reasoning | content
        self.starts_in_reasoning = starts_in_reasoning
        self.buffer = ""
        self.reasoning_ended = False

    def feed(self, delta: str) -> tuple[str, str]:
        self.buffer += delta
        reasoning, content = [], []
        while self.buffer:
            if self.state == "start":
                head = self.buffer.lstrip()
                if not head or (self.start.startswith(head) and head != self.start):
                    break  # whitespace, or a start tag still arriving
                if head.startswith(self.start):
                    self.buffer, self.state = head[len(self.start):], "reasoning"
                else:
                    self.state = "reasoning" if self.starts_in_reasoning else "content"
            elif self.state == "reasoning":
                i = self.buffer.find(self.end)
                if i >= 0:
                    reasoning.append(self.buffer[:i])
                    self.buffer, self.state, self.reasoning_ended = self.buffer[i + len(self.end):], "content", True
                    continue
                keep = held_prefix(self.buffer, self.end)
                reasoning.append(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            else:
                content.append(self.buffer)
                self.buffer = ""
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """What was held back, once the text is complete."""
        rest, self.buffer = self.buffer, ""
        if self.state == "reasoning" or (self.state == "start" and self.starts_in_reasoning):
            return rest, ""
        return "", rest


class ReasoningParser:
    """Base: text in `<think>...</think>` is reasoning. `starts_in_reasoning`: the prompt opened the think block
    (e.g. a template that ends with `<think>\\n`), so the output begins inside it."""

    start_token = "<think>"
    end_token = "</think>"
    always_starts_in_reasoning = False

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer

    def prompt_in_reasoning(self, prompt: str | None) -> bool:
        """Whether a prompt leaves the model inside a think block (a start after the last end)."""
        if prompt is None:
            return False
        return prompt.rfind(self.start_token) > prompt.rfind(self.end_token)

    def stream(self, prompt: str | None = None) -> ReasoningStream:
        closed = prompt is not None and prompt.rfind(self.end_token) > prompt.rfind(self.start_token)
        starts = not closed and (self.always_starts_in_reasoning or self.prompt_in_reasoning(prompt))
        return ReasoningStream(self.start_token, self.end_token, starts)

    def extract_reasoning(self, model_output: str, prompt: str | None = None) -> tuple[str | None, str | None]:
        """(reasoning_content, content) of a whole output; None for an empty part."""
        stream = self.stream(prompt)
        r1, c1 = stream.feed(model_output)
        r2, c2 = stream.finish()
        return (r1 + r2) or None, (c1 + c2) or None


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3: the model opens `<think>` itself unless the template did; without one, the output is all content."""


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1: the template opens the think block, so the output is reasoning until `</think>`."""

    always_starts_in_reasoning = True


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {"qwen3": Qwen3ReasoningParser, "deepseek_r1": DeepSeekR1ReasoningParser}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}; got {name!r}.") from None
