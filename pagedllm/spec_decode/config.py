"""`speculative_config` as vLLM takes it: a dict (or JSON on the command line) naming the proposer and how many tokens
it guesses per step."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model", "eagle", "eagle3")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    # ngram (prompt lookup): the longest suffix of prompt_lookup_max..prompt_lookup_min tokens found earlier in the
    # request's tokens proposes the tokens that followed it there
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 1
    model: str | None = None  # draft_model: a smaller model with the target's vocabulary; eagle / eagle3: the head's

    @classmethod
    def from_user(cls, value: dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """From `LLM(speculative_config={...})` or `--speculative-config '{...}'`; None: off. As vLLM: `method` may
        be left out when `model` is given (a draft model), and model="[ngram]" means the ngram method."""
        if value is None:
            return None
        raw = json.loads(value) if isinstance(value, str) else dict(value)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        if raw.get("model") == "[ngram]":
            raw["method"], raw["model"] = "ngram", None
        method = raw.setdefault("method", "draft_model" if raw.get("model") else None)
        if method not in METHODS:
            raise ValueError(f"speculative_config: method must be one of {', '.join(METHODS)}; got {method!r}.")
        if method in ("draft_model", "eagle", "eagle3") and not raw.get("model"):
            raise ValueError(f"speculative_config: method {method!r} needs 'model', the draft model's (or head's) path.")
        k = raw.get("num_speculative_tokens")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"speculative_config: num_speculative_tokens must be an integer >= 1; got {k!r}.")
        config = cls(**raw)
        if not 1 <= config.prompt_lookup_min <= config.prompt_lookup_max:
            raise ValueError(f"speculative_config: need 1 <= prompt_lookup_min ({config.prompt_lookup_min}) <= "
                             f"prompt_lookup_max ({config.prompt_lookup_max}).")
        return config
