"""The xgrammar backend: a constraint (StructuredOutputsParams) -> a validated grammar -> a compiled grammar -> matchers.

`grammar()` only parses (milliseconds, no vocabulary): it runs when a request is added, so an invalid schema, regex or
grammar is a ValueError there and never reaches the step loop. `compile()` builds the per-token tables against the
tokenizer's vocabulary (the expensive part); the manager runs it on a worker thread.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pagedllm.sampling_params import StructuredOutputsParams

# xgrammar's errors read "[08:38:51] /project/cpp/x.cc:94: Check failed: (...) is false: what went wrong".
_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: (Check failed: \(.*?\) is false: )?")

GrammarKey = tuple[str, str, bool, bool]
# Longest run of whitespace between JSON tokens: room for indented output, while a small model sampling at high
# temperature cannot wander off into endless newlines (which free whitespace otherwise allows).
_MAX_WHITESPACE = 24


def grammar_key(params: StructuredOutputsParams) -> GrammarKey:
    """What identifies a compiled grammar: requests with equal keys share one compile."""
    kind = params.kind
    value: Any = getattr(params, kind)
    if kind == "json":
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    elif kind == "choice":
        text = json.dumps(value)
    else:
        text = str(value)
    return kind, text, params.disable_any_whitespace, params.disable_additional_properties


def _clean(error: Exception) -> str:
    return _XGR_PREFIX.sub("", str(error).strip().splitlines()[0] if str(error).strip() else repr(error))


def _json_schema(text: str, strict_additional: bool) -> str:
    try:
        schema = json.loads(text)
    except ValueError as error:
        raise ValueError(f"structured_outputs.json is not valid JSON: {error}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError("structured_outputs.json must be a JSON schema object.")
    if strict_additional and isinstance(schema, dict):
        _close_objects(schema)
    return json.dumps(schema)


def _close_objects(schema: Any) -> None:
    """additionalProperties: false on every object schema that does not say (vLLM's disable_additional_properties)."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" or "properties" in schema:
            schema.setdefault("additionalProperties", False)
        for value in schema.values():
            _close_objects(value)
    elif isinstance(schema, list):
        for item in schema:
            _close_objects(item)


def _choice_ebnf(choices: list[str]) -> str:
    # JSON string escapes are valid EBNF string-literal escapes in xgrammar.
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def _structural_tag(xgr: Any, text: str) -> Any:
    """vLLM's legacy form {"structures": [{"begin", "schema", "end"}], "triggers": [...]}, or xgrammar's own format."""
    try:
        spec = json.loads(text)
    except ValueError as error:
        raise ValueError(f"structured_outputs.structural_tag is not valid JSON: {error}") from None
    if isinstance(spec, dict) and "structures" in spec:
        tags = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema", {})), end=s["end"])
                for s in spec["structures"]]
        return xgr.Grammar.from_structural_tag(tags, spec.get("triggers") or [s["begin"] for s in spec["structures"]])
    return xgr.Grammar.from_structural_tag(text)


def build_grammar(params: StructuredOutputsParams) -> Any:
    """The constraint as an xgrammar Grammar; ValueError naming the field and the problem if it is invalid."""
    import xgrammar as xgr

    kind = params.kind
    try:
        if kind == "json":
            value = params.json if isinstance(params.json, str) else json.dumps(params.json)
            schema = _json_schema(value, params.disable_additional_properties)
            return xgr.Grammar.from_json_schema(schema, any_whitespace=not params.disable_any_whitespace,
                                                max_whitespace_cnt=_MAX_WHITESPACE)
        if kind == "json_object":  # OpenAI's json_object: any object (not any JSON value); strict off keeps keys free
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=not params.disable_any_whitespace,
                                                strict_mode=False, max_whitespace_cnt=_MAX_WHITESPACE)
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(_choice_ebnf(params.choice or []))
        if kind == "grammar":
            text = params.grammar or ""
            # GBNF/EBNF rules read `name ::= ...`; anything else is taken as Lark (`name: ...`).
            return xgr.Grammar.from_ebnf(text) if "::=" in text else xgr.Grammar.from_lark(text)
        return _structural_tag(xgr, params.structural_tag or "")
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 - xgrammar raises RuntimeError (and others) for bad input
        what = {"json": "JSON schema", "regex": "regular expression", "grammar": "grammar",
                "structural_tag": "structural tag", "choice": "choice list"}.get(kind, kind)
        raise ValueError(f"structured_outputs.{kind} is not a valid {what}: {_clean(error)}") from None


class XgrammarBackend:
    """Compiles grammars against one tokenizer's vocabulary and makes matchers."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], max_threads: int = 2) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids or None)
        self.compiler = xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)  # the manager caches

    def compile(self, grammar: Any) -> Any:
        return self.compiler.compile_grammar(grammar)

    def matcher(self, compiled: Any) -> Any:
        # EOS only where the grammar may end. xgrammar keeps an unlimited rollback history, so rejected speculative
        # tokens can be undone (StructuredOutputRequest.rollback).
        return self.xgr.GrammarMatcher(compiled, override_stop_tokens=self.stop_token_ids or None)

    def allocate_bitmask(self, rows: int) -> Any:
        return self.xgr.allocate_token_bitmask(rows, self.vocab_size)
