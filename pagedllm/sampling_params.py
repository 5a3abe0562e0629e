"""Per-request sampling parameters, mirroring vLLM's `SamplingParams`."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # every output carries the whole text so far
    DELTA = 1  # every output carries only what is new since the last one
    FINAL_ONLY = 2  # one output, when the request finishes


_GREEDY_EPS = 1e-5


@dataclass
class StructuredOutputsParams:
    """A constraint on the generated text, as vLLM's: exactly one of json (a JSON schema, dict or string), regex,
    choice, grammar (EBNF/GBNF or Lark), json_object (any JSON object) or structural_tag (a JSON string)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False  # accepted for vLLM compatibility: xgrammar is the only backend
    disable_any_whitespace: bool = False  # JSON: no free whitespace between tokens (compact output)
    disable_additional_properties: bool = False  # JSON: objects get additionalProperties: false unless set
    whitespace_pattern: str | None = None  # accepted for vLLM compatibility; xgrammar ignores it
    structural_tag: str | None = None

    _KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

    def __post_init__(self) -> None:
        given = [k for k in self._KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs needs exactly one kind of constraint ({', '.join(self._KINDS)}); "
                f"{'none' if not given else ', '.join(given)} given."
            )
        if self.choice is not None and (not self.choice or any(not isinstance(c, str) for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings.")
        for name in ("regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string.")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError("structured_outputs.json must be a JSON schema (an object or its JSON text).")

    @property
    def kind(self) -> str:
        return next(k for k in self._KINDS if getattr(self, k) not in (None, False))


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no limit
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # top-N logprobs per generated token (plus the chosen one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Anything else a caller passes through the engine, as vLLM's: e.g. {"kv_transfer_params": {...}} (kv_transfer/)
    extra_args: dict[str, Any] | None = None
    structured_outputs: StructuredOutputsParams | None = None  # constrained decoding (pagedllm/structured_output/)
    # Built-in logits processors (pagedllm/logits_process/): allowed_token_ids, the only tokens that may be sampled;
    allowed_token_ids: list[int] | None = None
    # bad words, never generated: a word's last token is masked while the output ends with its other tokens. Words as
    # text need the engine's tokenizer (update_from_tokenizer, at add time); bad_words_token_ids are already tokenized.
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None
    # Filled in by the engine: the model's EOS ids, which also stop the request unless ignore_eos.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    # Filled in by update_from_tokenizer: `bad_words` as token ids (each word bare and after a space).
    bad_words_tokenized: list[list[int]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._verify()
        self.all_stop_token_ids = set(self.stop_token_ids)

    def _verify(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}.")

        if not isinstance(self.n, int) or self.n < 1:
            fail("n", "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature) or self.temperature < 0:
            fail("temperature", "must be a non-negative number")
        if math.isnan(self.top_p) or not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            fail("top_k", "must be -1 (disable), 0 (disable) or a positive integer")
        if math.isnan(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            fail("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if math.isnan(value) or not -2.0 <= value <= 2.0:
                fail(name, "must be in [-2, 2]")
        if math.isnan(self.repetition_penalty) or self.repetition_penalty <= 0.0:
            fail("repetition_penalty", "must be greater than zero")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            fail("max_tokens", "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            fail("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                fail(name, "must be a non-negative integer")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            fail("stop", "must hold only non-empty strings")
        if self.seed is not None and not isinstance(self.seed, int):
            fail("seed", "must be an integer")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            fail("structured_outputs", "must be a StructuredOutputsParams")
        if self.allowed_token_ids is not None and (
            not isinstance(self.allowed_token_ids, (list, tuple)) or not self.allowed_token_ids
            or any(not isinstance(t, int) for t in self.allowed_token_ids)
        ):
            fail("allowed_token_ids", "must be a non-empty list of token ids")
        if self.bad_words is not None and (
            not isinstance(self.bad_words, (list, tuple))
            or any(not isinstance(w, str) or not w.strip() for w in self.bad_words)
        ):
            fail("bad_words", "must be a list of non-empty strings")
        if self.bad_words_token_ids is not None and (
            not isinstance(self.bad_words_token_ids, (list, tuple))
            or any(not isinstance(w, (list, tuple)) or not w or any(not isinstance(t, int) for t in w)
                   for w in self.bad_words_token_ids)
        ):
            fail("bad_words_token_ids", "must be a list of non-empty lists of token ids")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            fail("extra_args", "must be a dict")

    def update_from_tokenizer(self, tokenizer: Any) -> None:
        """Tokenizes `bad_words` (each bare and after a space, as it reads mid-text), into bad_words_tokenized. Called
        by the engine when the request is added; calling it again gives the same result."""
        if not self.bad_words:
            self.bad_words_tokenized = None
            return
        words: list[list[int]] = []
        for word in self.bad_words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = list(tokenizer.encode(text, add_special_tokens=False))
                if ids and ids not in words:
                    words.append(ids)
        self.bad_words_tokenized = words

    @property
    def all_bad_words_token_ids(self) -> list[list[int]]:
        return [*(self.bad_words_token_ids or ()), *(self.bad_words_tokenized or ())]

    def verify_token_ids(self, vocab_size: int) -> None:
        """Checks the token ids the request names against the model's vocabulary."""
        named = (("stop_token_ids", self.stop_token_ids), ("logit_bias", list(self.logit_bias or {})),
                 ("allowed_token_ids", self.allowed_token_ids or []),
                 ("bad_words", [t for word in self.all_bad_words_token_ids for t in word]))
        for name, ids in named:
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"{name} holds token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}.")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def clone(self) -> SamplingParams:
        """A copy for one of the n samples of a request (vLLM gives sample i the seed `seed + i`)."""
        import copy

        return copy.deepcopy(self)


@dataclass
class BeamSearchParams:
    """Parameters of `LLM.beam_search` (vLLM's names). The search is transformers' `generate(num_beams=beam_width,
    do_sample=False, length_penalty=...)`: finished hypotheses rank by cum_logprob / num_tokens ** length_penalty."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # accepted as vLLM does; beams rank by logprobs of the raw logits, so it has no effect
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False  # keep the EOS token's text in `text`

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}.")

        if not isinstance(self.beam_width, int) or self.beam_width < 1:
            fail("beam_width", "must be an integer >= 1")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            fail("max_tokens", "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature) or self.temperature < 0:
            fail("temperature", "must be a non-negative number")
        if not isinstance(self.length_penalty, (int, float)) or not math.isfinite(self.length_penalty):
            fail("length_penalty", "must be a finite number")
