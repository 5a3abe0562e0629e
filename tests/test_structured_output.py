"""Constrained decoding on the bundled SmolLM2 (offline): every constrained output obeys its constraint, free requests
beside constrained ones are unchanged, bad constraints are readable ValueErrors, and the plumbing (queue while
compiling, reasoning gate, n > 1, prefix caching, async scheduling) holds."""

from __future__ import annotations

import json
import re
from concurrent.futures import Future

import jsonschema
import pytest

from pagedllm import LLM, SamplingParams, StructuredOutputsParams
from pagedllm.entrypoints.llm import render_chat
from tests.conftest import assert_clean

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"]},
    "nested": {"type": "object", "properties": {
        "city": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                  "population": {"type": "integer", "minimum": 1, "maximum": 99999999}},
                 "required": ["name", "population"]},
        "country": {"type": "string", "maxLength": 20}}, "required": ["city", "country"]},
    "array": {"type": "object", "properties": {"colors": {"type": "array", "minItems": 2, "maxItems": 3,
                                                          "items": {"type": "string", "maxLength": 10}}},
              "required": ["colors"]},
    "enum": {"type": "object", "properties": {"mood": {"enum": ["happy", "sad", "angry"]},
                                              "level": {"type": "integer", "enum": [1, 2, 3]}},
             "required": ["mood", "level"]},
    "any_of": {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                                    {"type": "boolean"}, {"type": "null"}]}},
               "required": ["value"]},
    "pattern_format": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                                        "email": {"type": "string", "format": "email"},
                                                        "day": {"type": "string", "format": "date"}},
                       "required": ["code", "email", "day"]},
    "bounded_numbers": {"type": "object", "properties": {"price": {"type": "number", "minimum": 0.5, "maximum": 99.5},
                                                         "count": {"type": "integer", "exclusiveMinimum": 3,
                                                                   "exclusiveMaximum": 7}},
                        "required": ["price", "count"]},
}
QUESTIONS = ["Describe a person as JSON.", "Tell me about a big city.", "List some colors.", "How do you feel?",
             "Give me a value.", "Make up a product code and an email.", "What does it cost?"]
FREE = ["The capital of France is", "Write a haiku about the sea.", "Count from one to five:"]


def _chat(llm: LLM, text: str) -> dict:
    return render_chat(llm.get_tokenizer(), [{"role": "user", "content": text}])


def _validate(schema: dict, text: str) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


@pytest.fixture(scope="module")
def llm(smollm2: str) -> LLM:
    return LLM(smollm2, max_model_len=1024, kv_cache_memory=256 << 20, seed=0)


def _so(**kwargs: object) -> SamplingParams:
    constraint = kwargs.pop("constraint")
    return SamplingParams(max_tokens=kwargs.pop("max_tokens", 200), structured_outputs=constraint, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_json_schemas_in_mixed_batches(llm: LLM, temperature: float) -> None:
    free_params = SamplingParams(temperature=0, max_tokens=24)
    alone = [o.outputs[0].token_ids for o in llm.generate(FREE, free_params, use_tqdm=False)]
    prompts, params = [], []
    for (name, schema), question in zip(SCHEMAS.items(), QUESTIONS):
        prompts.append(_chat(llm, question))
        params.append(_so(constraint=StructuredOutputsParams(json=schema), temperature=temperature, seed=7))
    for i, prompt in enumerate(FREE):  # interleaved with the constrained ones
        prompts.insert(2 * i + 1, prompt)
        params.insert(2 * i + 1, free_params)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    free_out = [o.outputs[0].token_ids for o, p in zip(outputs, params) if p.structured_outputs is None]
    assert free_out == alone  # constrained neighbours change nothing for the free rows
    constrained = [(o, p) for o, p in zip(outputs, params) if p.structured_outputs is not None]
    for (out, p), schema in zip(constrained, SCHEMAS.values()):
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
        _validate(schema, out.outputs[0].text)
    assert_clean(llm.llm_engine)


def test_regex_choice_grammar_json_object(llm: LLM) -> None:
    ebnf = 'root ::= "(" num " " op " " num ")"\nnum ::= [1-9] [0-9]?\nop ::= "+" | "-" | "*"'
    lark = 'start: "yes" | "no" | "maybe"'
    cases = [
        (StructuredOutputsParams(regex=r"[A-Z][a-z]{2,8} (19|20)[0-9]{2}"), lambda t: re.fullmatch(r"[A-Z][a-z]{2,8} (19|20)[0-9]{2}", t)),
        (StructuredOutputsParams(choice=["Paris", "London", "Rome, Italy"]), lambda t: t in ("Paris", "London", "Rome, Italy")),
        (StructuredOutputsParams(grammar=ebnf), lambda t: re.fullmatch(r"\([1-9][0-9]? [+*-] [1-9][0-9]?\)", t)),
        (StructuredOutputsParams(grammar=lark), lambda t: t in ("yes", "no", "maybe")),
    ]
    prompts = [_chat(llm, q) for q in ("Name a month and a year.", "Which city is in France?", "Write a sum.",
                                       "Is the sky blue?")]
    for temperature in (0.0, 1.0):
        params = [_so(constraint=c, temperature=temperature, seed=1, max_tokens=40) for c, _ in cases]
        for out, (_, check) in zip(llm.generate(prompts, params, use_tqdm=False), cases):
            assert out.outputs[0].finish_reason == "stop" and check(out.outputs[0].text), out.outputs[0].text
    # Any JSON object (OpenAI's json_object): free-form, so it may run long; what is there is an object's start.
    out = llm.generate([_chat(llm, 'Reply with {"ok": true}')],
                       _so(constraint=StructuredOutputsParams(json_object=True), temperature=0, max_tokens=40), use_tqdm=False)
    text = out[0].outputs[0].text
    assert isinstance(json.loads(text), dict) if out[0].outputs[0].finish_reason == "stop" else text.startswith("{")


def test_n_samples_have_their_own_matchers(llm: LLM) -> None:
    schema = SCHEMAS["enum"]
    params = _so(constraint=StructuredOutputsParams(json=schema), temperature=1.0, n=4, seed=3)
    out = llm.generate([_chat(llm, "How do you feel?")], params, use_tqdm=False)[0]
    assert len(out.outputs) == 4
    for completion in out.outputs:
        _validate(schema, completion.text)


def test_prefix_caching_and_cached_grammar(llm: LLM) -> None:
    params = _so(constraint=StructuredOutputsParams(json=SCHEMAS["person"]), temperature=0)
    prompt = _chat(llm, "Describe a person as JSON. " * 8)  # several full blocks, so the second run hits the cache
    first = llm.generate([prompt], params, use_tqdm=False)[0]
    hits = llm.llm_engine.structured_output.cache_hits
    second = llm.generate([prompt], params, use_tqdm=False)[0]
    assert second.num_cached_tokens > 0 and second.outputs[0].token_ids == first.outputs[0].token_ids
    assert llm.llm_engine.structured_output.cache_hits == hits + 1


@pytest.mark.parametrize("constraint, needle", [
    (dict(json={"type": "foo"}), "structured_outputs.json is not a valid JSON schema: Unsupported type"),
    (dict(json="{not json"), "structured_outputs.json is not valid JSON"),
    (dict(regex="(ab"), "structured_outputs.regex is not a valid regular expression"),
    (dict(grammar="root ::= missing_rule"), "structured_outputs.grammar is not a valid grammar"),
])
def test_invalid_constraints_are_value_errors(llm: LLM, constraint: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        llm.generate(["Hi"], SamplingParams(structured_outputs=StructuredOutputsParams(**constraint)), use_tqdm=False)
    assert_clean(llm.llm_engine)
    assert llm.generate(["Hi"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_params_need_exactly_one_constraint() -> None:
    with pytest.raises(ValueError, match="exactly one kind"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="exactly one kind"):
        StructuredOutputsParams()


def test_scheduler_keeps_compiling_requests_waiting_in_order(llm: LLM) -> None:
    """A request whose grammar is not ready stays queued (in place) while the ones behind it run."""
    engine = llm.llm_engine
    engine.add_request("slow", "Hello", SamplingParams(max_tokens=2, structured_outputs=StructuredOutputsParams(regex="ab")))
    slow = engine.requests["slow"]
    state = slow.structured_output
    state.future, state.ready = Future(), False  # as if still compiling
    engine.structured_output._waiting.append(slow)
    engine.add_request("free", "Hello", SamplingParams(max_tokens=2))
    engine.step()
    assert engine.scheduler.waiting[0] is slow and engine.requests["free"] in engine.scheduler.running
    done: Future = Future()
    done.set_result(engine.structured_output.validate(StructuredOutputsParams(regex="ab")).result())
    state.future = done
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outputs["slow"].outputs[0].text == "ab" and outputs["slow"].outputs[0].finish_reason == "stop"
    assert_clean(engine)


def test_reasoning_gate() -> None:
    from pagedllm.structured_output.request import StructuredOutputRequest, reasoning_ended

    start, end = [7], [8, 9]
    assert not reasoning_ended([1, 7, 2], start, end) and reasoning_ended([1, 7, 8, 9, 3], start, end)
    assert not reasoning_ended([1, 2], start, end)

    class Matcher:
        accepted: list[int] = []

        def accept_token(self, token: int) -> bool:
            self.accepted.append(token)
            return True

    state = StructuredOutputRequest(Future(), reasoning_end=end, in_reasoning=True, matcher=Matcher(), ready=True)
    out: list[int] = []
    for token in (5, 8, 9, 4, 6):
        assert not state.active or out[-2:] == end or state.matcher.accepted
        out.append(token)
        state.accept(token, out)
    assert state.matcher.accepted == [4, 6] and state.active


def test_grammar_applies_after_reasoning(smollm2: str) -> None:
    llm = LLM(smollm2, max_model_len=512, kv_cache_memory=64 << 20, reasoning_parser="qwen3")
    tok = llm.get_tokenizer()
    closed = render_chat(tok, [{"role": "user", "content": "Pick a color."},
                               {"role": "assistant", "content": "<think>\nI like blue.\n</think>\n\n"}],
                         continue_final_message=True)
    opened = render_chat(tok, [{"role": "user", "content": "Pick a color."}, {"role": "assistant", "content": "<think>\n"}],
                         continue_final_message=True)
    choice = StructuredOutputsParams(choice=["red", "blue"])
    after, inside = llm.generate([closed, opened], SamplingParams(temperature=0, max_tokens=12, structured_outputs=choice),
                                 use_tqdm=False)
    assert after.outputs[0].text in ("red", "blue")  # the prompt closed the think block: constrained at once
    assert inside.outputs[0].text not in ("red", "blue")  # still thinking: free until </think>


def test_async_scheduling_with_constraints(smollm2: str) -> None:
    llm = LLM(smollm2, max_model_len=512, kv_cache_memory=64 << 20, async_scheduling=True)
    free = SamplingParams(temperature=0, max_tokens=16)
    alone = llm.generate(FREE, free, use_tqdm=False)
    schema = SCHEMAS["person"]
    prompts = FREE + [_chat(llm, QUESTIONS[0])]
    outputs = llm.generate(prompts, [free] * 3 + [_so(constraint=StructuredOutputsParams(json=schema), temperature=0)],
                           use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs[:3]] == [o.outputs[0].token_ids for o in alone]
    _validate(schema, outputs[3].outputs[0].text)
    assert_clean(llm.llm_engine)
