"""Request models of the OpenAI server, validated without a server: what a body is rejected for, and the
400 (message, param) that the rejection becomes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.requests import Request

from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from pagedllm.entrypoints.openai.serving_base import APIError, read_json, validation_error

COMPLETION = {"prompt": [5, 6, 7]}
CHAT = {"messages": [{"role": "user", "content": "Hi!"}]}
CASES = [(CompletionRequest, COMPLETION), (ChatCompletionRequest, CHAT)]


def rejection(model: type[SamplingRequest], body: dict[str, Any]) -> APIError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_error(info.value)


def json_request(body: dict[str, Any]) -> Request:
    """A POST with `body` as JSON, as the server's routes receive it."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", b"application/json")]}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    return Request(scope, receive)


@pytest.mark.parametrize("model, base", CASES, ids=["completion", "chat"])
@pytest.mark.parametrize("stream", [None, False], ids=["stream-unset", "stream-false"])
@pytest.mark.parametrize("options", [{"include_usage": True}, {}], ids=["include-usage", "empty"])
def test_stream_options_without_stream_is_a_400(model: type[SamplingRequest], base: dict, stream: bool | None,
                                                options: dict) -> None:
    body = {**base, "stream_options": options, **({} if stream is None else {"stream": stream})}
    error = rejection(model, body)
    assert (error.status, error.param) == (400, "stream_options")
    assert error.message == "stream_options: Value error, stream_options can only be set when stream is true"
    # The same through the server's body reader.
    with pytest.raises(APIError) as info:
        asyncio.run(read_json(json_request(body), model, 1 << 20))
    assert (info.value.status, info.value.param, info.value.message) == (400, "stream_options", error.message)


@pytest.mark.parametrize("model, base", CASES, ids=["completion", "chat"])
def test_stream_options_with_stream_or_null_are_accepted(model: type[SamplingRequest], base: dict) -> None:
    assert model.model_validate({**base, "stream": True, "stream_options": {"include_usage": True}}).include_usage
    assert not model.model_validate({**base, "stream": True, "stream_options": {}}).include_usage
    assert not model.model_validate({**base, "stream_options": None}).include_usage  # null: as if absent
    assert not model.model_validate(base).stream


def test_a_bad_stream_is_reported_as_itself() -> None:
    """When `stream` itself is invalid, the 400 names `stream`, not the stream_options that depend on it."""
    body = {**COMPLETION, "stream": "sometimes", "stream_options": {"include_usage": True}}
    error = rejection(CompletionRequest, body)
    assert (error.status, error.param) == (400, "stream")
