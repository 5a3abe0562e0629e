"""Structured output and tool calling through a running `pagedllm serve`, with the real `openai` client (and
LangChain's ChatOpenAI when installed): parse() into a pydantic model, guided_* / structured_outputs fields,
400s for bad constraints (the server keeps serving), tool calls streamed for tool_choice required, named and auto
(hermes), and reasoning_content with --reasoning-parser."""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server_utils import SMALL_SERVER_ARGS, ServerProcess

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone.",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 30}}, "required": ["tz"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HERMES_REGEX = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|London)", "unit": "celsius"\}\}\n</tool_call>'


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    pets: list[Literal["cat", "dog", "fish"]] = Field(max_length=3)


@pytest.fixture(scope="module")
def server() -> Any:
    proc = ServerProcess(SMALL_SERVER_ARGS + ["--max-model-len", "1024", "--enable-auto-tool-choice",
                                              "--tool-call-parser", "hermes"])
    yield proc
    proc.stop()


def _stream_tool_calls(client: Any, **kwargs: Any) -> tuple[list[dict], str | None, str]:
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.id is not None:  # the first piece of a call: id, type and name, before any argument text
                assert d.index not in calls and d.type == "function" and d.function.name
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
            else:
                assert d.index in calls and not d.function.name
                calls[d.index]["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish, content


def test_parse_into_pydantic_model(server: ServerProcess) -> None:
    client = server.client()
    completion = client.chat.completions.parse(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Invent a person with pets."}],
        response_format=Person, max_tokens=200, temperature=0)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Person) and completion.choices[0].finish_reason == "stop"


def test_guided_fields_and_structured_outputs(server: ServerProcess) -> None:
    client = server.client()
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 100}},
              "required": ["answer"]}
    out = client.completions.create(model="SmolLM2-135M-Instruct", prompt="2 + 2 =", max_tokens=60,
                                    extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(out.choices[0].text), schema)
    out = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=10,
                                         extra_body={"guided_choice": ["sunny", "rainy"]})
    assert out.choices[0].message.content in ("sunny", "rainy")
    out = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=20,
                                         extra_body={"structured_outputs": {"regex": "[0-9]{2} degrees"}})
    assert out.choices[0].message.content.endswith(" degrees") and out.choices[0].finish_reason == "stop"
    out = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=60, temperature=0,
                                         messages=[{"role": "user", "content": 'Reply with {"ok": true}'}],
                                         response_format={"type": "json_object"})
    text = out.choices[0].message.content
    assert isinstance(json.loads(text), dict) if out.choices[0].finish_reason == "stop" else text.startswith("{")


@pytest.mark.parametrize("body, needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json is not a valid JSON schema"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex is not a valid regular expression"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar.grammar is not a valid grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one kind"),
])
def test_bad_constraints_are_400(server: ServerProcess, body: dict, needle: str) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=5, extra_body=body)
    assert needle in str(error.value)
    ok = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=3)
    assert ok.choices[0].message.content


def test_tool_choice_required_streams_calls(server: ServerProcess) -> None:
    client = server.client()
    calls, finish, content = _stream_tool_calls(client, model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER, TIME],
                                                tool_choice="required", max_tokens=200, temperature=0)
    assert calls and finish == "tool_calls" and not content
    specs = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), specs[call["name"]])
    whole = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER, TIME],
                                           tool_choice="required", max_tokens=200, temperature=0)
    message = whole.choices[0].message
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
        [(c["name"], json.loads(c["arguments"])) for c in calls]
    assert whole.choices[0].finish_reason == "tool_calls"


def test_named_tool_choice(server: ServerProcess) -> None:
    client = server.client()
    named = {"type": "function", "function": {"name": "get_time"}}
    calls, finish, _ = _stream_tool_calls(client, model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER, TIME],
                                          tool_choice=named, max_tokens=100, temperature=0.7, seed=1)
    assert [c["name"] for c in calls] == ["get_time"] and finish == "stop"
    jsonschema.validate(json.loads(calls[0]["arguments"]), TIME["function"]["parameters"])
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER],
                                       tool_choice=named, max_tokens=5)


def test_auto_tool_choice_with_hermes(server: ServerProcess) -> None:
    """The model writes a Hermes call (held to the format by a regex, as SmolLM2 does not know it); the parser turns
    it into streamed tool_calls; a conversation with the call and its result renders and answers."""
    client = server.client()
    kwargs = dict(model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER], max_tokens=150,
                  extra_body={"structured_outputs": {"regex": HERMES_REGEX}})
    calls, finish, content = _stream_tool_calls(client, **kwargs)
    assert finish == "tool_calls" and not content
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"])["unit"] == "celsius"
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    assert whole.message.tool_calls[0].function.name == "get_weather"
    plain = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER], max_tokens=8)
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": whole.message.tool_calls[0].id, "type": "function", "function": {
            "name": "get_weather", "arguments": whole.message.tool_calls[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": whole.message.tool_calls[0].id, "content": "18 degrees, sunny"}]
    answer = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=history, tools=[WEATHER],
                                            tool_choice="none", max_tokens=8)
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")


def test_langchain(server: ServerProcess) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model="SmolLM2-135M-Instruct", base_url=server.url("/v1"), api_key="unused",
                                      temperature=0, max_tokens=200, max_retries=0)
    person = llm.with_structured_output(Person, method="json_schema").invoke("Invent a person with pets.")
    assert isinstance(person, Person)

    class GetWeather(BaseModel):
        """Current weather in a city."""

        city: str = Field(max_length=30)

    message = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("Weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "GetWeather"
    assert isinstance(message.tool_calls[0]["args"]["city"], str)
    message = llm.bind_tools([GetWeather], tool_choice="any").invoke("Weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "GetWeather"
    free = llm.bind_tools([GetWeather]).invoke("Say hi.")  # tool_choice auto, parsed by hermes: plain text here
    assert free.content or free.tool_calls


def test_reasoning_parser_and_auto_needs_flag() -> None:
    proc = ServerProcess(SMALL_SERVER_ARGS + ["--reasoning-parser", "deepseek_r1"])
    try:
        client = proc.client()
        with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
            client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER], max_tokens=5)
        thinking = ASK + [{"role": "assistant", "content": "<think>\nThe user asks about"}]
        body = dict(model="SmolLM2-135M-Instruct", messages=thinking, max_tokens=12, temperature=0,
                    extra_body={"continue_final_message": True, "add_generation_prompt": False})
        whole = client.chat.completions.create(**body).choices[0].message
        assert whole.reasoning_content and whole.content is None  # no </think> yet: all reasoning
        streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                           for c in client.chat.completions.create(stream=True, **body) if c.choices)
        assert streamed == whole.reasoning_content
        closed = ASK + [{"role": "assistant", "content": "<think>\nEasy.\n</think>\n\n"}]
        out = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=closed, max_tokens=10,
                                             extra_body={"continue_final_message": True, "add_generation_prompt": False,
                                                         "guided_choice": ["sunny", "rainy"]})
        assert out.choices[0].message.content in ("sunny", "rainy")  # the grammar applies after the reasoning
    finally:
        proc.stop()
