"""The OpenAI-compatible server, end to end: a real `pagedllm serve` subprocess (default SmolLM2, small context)
driven with the official `openai` client and raw HTTP; plus in-process checks of failure handling
(engine death, one request failing, capacity) on a tiny random model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any, Iterator

import httpx
import pytest
from openai import APIStatusError
from prometheus_client.parser import text_string_to_metric_families

from pagedllm.engine.llm_engine import LLMEngine
from tests.server_utils import SMALL_SERVER_ARGS, ServerProcess

GREEDY: dict[str, Any] = dict(temperature=0.0)
NO_EOS: dict[str, Any] = {"extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    # Async scheduling (the CUDA default) here; the shutdown test's server and tiny_app cover the synchronous engine.
    proc = ServerProcess([*SMALL_SERVER_ARGS, "--async-scheduling", "--max-request-body-bytes", "100000", "--served-model-name", "SmolLM2-135M-Instruct", "smol"])
    yield proc
    assert proc.stop() == 0, proc.logs()


def metrics(server: ServerProcess) -> dict[str, float]:
    """Every sample of /metrics (parsed by prometheus_client), keyed by name and its non-model labels."""
    text = httpx.get(server.url("/metrics")).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("model_name", "le"))
            if "le" not in s.labels:
                samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return samples


def wait_idle(server: ServerProcess, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        idle = (m["pagedllm:num_requests_running"], m["pagedllm:num_requests_waiting"], m["pagedllm:kv_cache_usage_perc"]) == (0, 0, 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


# ---- basics ---------------------------------------------------------------------------------------
def test_models_health_version(server: ServerProcess) -> None:
    models = server.client().models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct", "smol"]
    aliased = server.client().completions.create(model="smol", prompt="Hi", max_tokens=1)
    assert aliased.model == "SmolLM2-135M-Instruct"  # answers carry the first served name
    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.get(server.url("/version")).json()["version"]
    ids = httpx.post(server.url("/tokenize"), json={"prompt": "Hello world"}).json()
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == 256
    assert httpx.post(server.url("/detokenize"), json={"tokens": ids["tokens"]}).json()["prompt"] == "Hello world"
    chat = [{"role": "user", "content": "Hello world"}]
    counted = httpx.post(server.url("/tokenize"), json={"messages": chat}).json()["count"]
    assert counted == server.client().chat.completions.create(model="smol", messages=chat, max_tokens=1).usage.prompt_tokens


def test_completion_stream_equals_plain_and_usage(server: ServerProcess) -> None:
    client = server.client()
    prompt = "The capital of France is"
    plain = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=8, **GREEDY, **NO_EOS)
    n_prompt = httpx.post(server.url("/tokenize"), json={"prompt": prompt}).json()["count"]
    assert plain.usage.prompt_tokens == n_prompt and plain.usage.completion_tokens == 8 and plain.usage.total_tokens == n_prompt + 8
    assert plain.choices[0].finish_reason == "length" and "Paris" in plain.choices[0].text
    chunks = list(client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY, **NO_EOS))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert len([c for c in chunks if c.choices]) == 8  # one chunk per step
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == n_prompt


def test_n2_logprobs_seed(server: ServerProcess) -> None:
    client = server.client()

    def sample() -> Any:
        return client.completions.create(model="SmolLM2-135M-Instruct", prompt="Once upon a time", max_tokens=6, n=2,
                                         temperature=1.0, seed=1234, logprobs=2, **NO_EOS)

    first, second = sample(), sample()
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]  # seeded: reproducible
    assert first.usage.completion_tokens == 12
    for choice in first.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
        assert "".join(lp.tokens) == choice.text
        assert all(1 <= len(top) <= 3 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)


def test_stop_string(server: ServerProcess) -> None:
    client = server.client()
    kwargs = dict(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=20, stop=["."], **GREEDY)
    plain = client.completions.create(**kwargs).choices[0]
    assert plain.finish_reason == "stop" and "." not in plain.text and plain.text.strip()
    streamed = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed) == plain.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_prompt_forms_and_echo(server: ServerProcess) -> None:
    client = server.client()
    ids = httpx.post(server.url("/tokenize"), json={"prompt": "The capital of France is"}).json()["tokens"]
    as_text = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=3, **GREEDY)
    as_ids = client.completions.create(model="SmolLM2-135M-Instruct", prompt=ids, max_tokens=3, **GREEDY)
    assert as_ids.choices[0].text == as_text.choices[0].text
    many = client.completions.create(model="SmolLM2-135M-Instruct", prompt=[ids, [ids[0]]], max_tokens=3, **GREEDY, **NO_EOS)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == as_text.choices[0].text
    assert many.usage.prompt_tokens == len(ids) + 1 and many.usage.completion_tokens == 6
    texts = client.completions.create(model="SmolLM2-135M-Instruct", prompt=["Hi", "The capital of France is"], max_tokens=3, **GREEDY)
    assert texts.choices[1].text == as_text.choices[0].text
    echo = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=3,
                                     echo=True, logprobs=1, **GREEDY)
    assert echo.choices[0].text == "The capital of France is" + as_text.choices[0].text
    lp = echo.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 3


def test_chat(server: ServerProcess) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "Write a long poem about the sea."}]
    plain = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_completion_tokens=8,
                                           logprobs=True, top_logprobs=2, **GREEDY, **NO_EOS)
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length" and plain.usage.completion_tokens == 8
    assert len(choice.logprobs.content) == 8 and all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    chunks = list(client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY, **NO_EOS))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    n2 = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=4, n=2, seed=7, temperature=1.0)
    assert sorted(c.index for c in n2.choices) == [0, 1]
    # Assistant prefill: the reply continues the last message instead of starting a new turn.
    prefill = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "The capital of France is"}]
    cont = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=prefill, max_tokens=4, **GREEDY,
                                          extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert "Paris" in cont.choices[0].message.content


def test_completion_beam_search(server: ServerProcess, smollm2: str) -> None:
    from pagedllm import LLM
    from pagedllm.sampling_params import BeamSearchParams

    client = server.client()
    prompt, beam_search = "The capital of France is", {"use_beam_search": True}
    beams = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=8, n=2, extra_body=beam_search)
    llm = LLM(smollm2, max_model_len=256, kv_cache_memory=64 << 20)
    expected = llm.beam_search(prompt, BeamSearchParams(beam_width=2, max_tokens=8))[0].sequences
    assert [(c.index, c.text, c.finish_reason) for c in beams.choices] == [(i, s.text, s.finish_reason) for i, s in enumerate(expected)]
    assert beams.usage.completion_tokens == sum(len(s.logprobs) for s in expected)
    assert beams.usage.prompt_tokens == len(expected[0].tokens) - len(expected[0].logprobs)
    with pytest.raises(APIStatusError) as error:
        client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=8, n=2, stream=True, extra_body=beam_search)
    assert error.value.status_code == 400 and "use_beam_search" in error.value.message


# ---- bad input ------------------------------------------------------------------------------------
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
OK_CHAT = [{"role": "user", "content": "hi"}]
BAD_INPUTS = [
    # (id, path, body (dict, or raw bytes), headers, status, param)
    ("malformed-json", COMPLETIONS, b'{"prompt": "x",', None, 400, None),
    ("content-type", COMPLETIONS, b'{"prompt": "x"}', {"content-type": "text/plain"}, 415, None),
    ("unknown-model", COMPLETIONS, {"model": "gpt-5", "prompt": "x"}, None, 404, "model"),
    ("empty-prompt", COMPLETIONS, {"prompt": ""}, None, 400, "prompt"),
    ("empty-prompt-list", COMPLETIONS, {"prompt": []}, None, 400, "prompt"),
    ("empty-messages", CHAT, {"messages": []}, None, 400, "messages"),
    ("prompt-too-long", COMPLETIONS, {"prompt": [100] * 300}, None, 400, "prompt"),
    ("max-tokens-zero", COMPLETIONS, {"prompt": "x", "max_tokens": 0}, None, 400, "max_tokens"),
    ("max-tokens-negative", CHAT, {"messages": OK_CHAT, "max_completion_tokens": -1}, None, 400, "max_completion_tokens"),
    ("max-tokens-beyond-context", COMPLETIONS, {"prompt": "x", "max_tokens": 1000}, None, 400, "max_tokens"),
    ("chat-beyond-context", CHAT, {"messages": OK_CHAT, "max_tokens": 1000}, None, 400, "max_tokens"),
    ("n-above-cap", COMPLETIONS, {"prompt": "x", "n": 17}, None, 400, "n"),
    ("logprobs-above-20", COMPLETIONS, {"prompt": "x", "logprobs": 21}, None, 400, "logprobs"),
    ("top-logprobs-above-20", CHAT, {"messages": OK_CHAT, "logprobs": True, "top_logprobs": 21}, None, 400, "top_logprobs"),
    ("prompt-id-outside-vocab", COMPLETIONS, {"prompt": [1, 49152]}, None, 400, "prompt"),
    ("negative-prompt-id", COMPLETIONS, {"prompt": [[5, -1]]}, None, 400, "prompt"),
    ("logit-bias-outside-vocab", COMPLETIONS, {"prompt": "x", "logit_bias": {"99999": 5}}, None, 400, "logit_bias"),
    ("stop-token-outside-vocab", CHAT, {"messages": OK_CHAT, "stop_token_ids": [49152]}, None, 400, "stop_token_ids"),
    ("temperature-nan", COMPLETIONS, b'{"prompt": "x", "temperature": NaN}', None, 400, "temperature"),
    ("temperature-negative", CHAT, {"messages": OK_CHAT, "temperature": -0.5}, None, 400, "temperature"),
    ("top-p-zero", COMPLETIONS, {"prompt": "x", "top_p": 0}, None, 400, "top_p"),
    ("top-p-above-one", COMPLETIONS, {"prompt": "x", "top_p": 1.5}, None, 400, "top_p"),
    ("oversized-body", COMPLETIONS, {"prompt": "x" * 200_000}, None, 413, None),
    ("prefill-needs-assistant", CHAT, {"messages": OK_CHAT, "continue_final_message": True}, None, 400, "continue_final_message"),
    ("body-not-object", COMPLETIONS, b"[1, 2]", None, 400, None),
    ("prompt-of-booleans", COMPLETIONS, {"prompt": [True, False]}, None, 400, "prompt"),
    ("missing-prompt", COMPLETIONS, {"max_tokens": 3}, None, 400, "prompt"),
]


@pytest.mark.parametrize("path,body,headers,status,param", [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(server: ServerProcess, path: str, body: Any, headers: dict | None, status: int, param: str | None) -> None:
    if isinstance(body, bytes):
        response = httpx.post(server.url(path), content=body, headers=headers or {"content-type": "application/json"})
    else:
        response = httpx.post(server.url(path), json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param, error
    if param is not None:
        assert param in error["message"] or param == "model", error
    ok = httpx.post(server.url(COMPLETIONS), json={"prompt": "Hello", "max_tokens": 1})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1


# ---- concurrency, disconnects, metrics ---------------------------------------------------------------
def test_64_concurrent_streams_match_alone(server: ServerProcess) -> None:
    # 32 distinct prompts, each sent by two clients: cross-talk would show as a mismatch, and running the
    # references alone stays affordable on a small CPU.
    distinct = [f"Fact number {i}: the {w} is" for i, w in enumerate(["sky", "sea", "sun", "moon"] * 8)]
    client = server.client()
    reference = {p: client.completions.create(model="SmolLM2-135M-Instruct", prompt=p, max_tokens=5, **GREEDY, **NO_EOS).choices[0].text
                 for p in distinct}
    prompts = distinct + distinct[::-1]
    alone = [reference[p] for p in prompts]
    assert len(set(alone)) > 8  # the prompts really differ

    async def run_all() -> list[str]:
        aclient = server.async_client()

        async def one(prompt: str) -> str:
            stream = await aclient.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=5, stream=True,
                                                      **GREEDY, **NO_EOS)
            return "".join([chunk.choices[0].text async for chunk in stream])

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    assert asyncio.run(run_all()) == alone


def test_disconnect_storm_frees_everything(server: ServerProcess) -> None:
    async def storm() -> None:
        aclient = server.async_client()

        async def cancelled_stream(i: int) -> None:
            stream = await aclient.completions.create(model="SmolLM2-135M-Instruct", prompt=f"Tell me a long story number {i}",
                                                      max_tokens=200, stream=True, **NO_EOS)
            received = 0
            async for _ in stream:
                received += 1
                if received == 2:
                    break
            await stream.close()

        async def abandoned_plain() -> None:  # a non-streaming client that gives up
            async with httpx.AsyncClient(timeout=1.0) as http:
                with pytest.raises(httpx.ReadTimeout):
                    await http.post(server.url(COMPLETIONS), json={"prompt": "A long story", "max_tokens": 200, "ignore_eos": True})

        try:
            await asyncio.gather(*(cancelled_stream(i) for i in range(32)), abandoned_plain())
        finally:
            await aclient.close()

    before = wait_idle(server)
    asyncio.run(storm())
    m = wait_idle(server)
    assert (m["pagedllm:num_requests_running"], m["pagedllm:num_requests_waiting"], m["pagedllm:kv_cache_usage_perc"]) == (0, 0, 0)
    # Aborted at once, not run to the end: 33 aborts, and far fewer than 33 x 200 tokens generated.
    aborts = "pagedllm:request_success_total{finished_reason=abort}"
    assert m[aborts] - before[aborts] == 33
    assert m["pagedllm:generation_tokens_total"] - before["pagedllm:generation_tokens_total"] < 33 * 200 / 4
    start = time.monotonic()
    answer = server.client().completions.create(model="SmolLM2-135M-Instruct", prompt="Hello", max_tokens=3, **NO_EOS)
    assert answer.usage.completion_tokens == 3 and time.monotonic() - start < 5


def test_metrics_counters_match_requests(server: ServerProcess) -> None:
    before = wait_idle(server)
    client = server.client()
    usages = [client.completions.create(model="SmolLM2-135M-Instruct", prompt=f"Count to {i}", max_tokens=4, **NO_EOS).usage
              for i in range(3)]
    chat = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=OK_CHAT, max_tokens=2, **NO_EOS).usage
    after = wait_idle(server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("pagedllm:request_success_total{finished_reason=length}") == 4
    assert delta("pagedllm:prompt_tokens_total") == sum(u.prompt_tokens for u in usages) + chat.prompt_tokens
    assert delta("pagedllm:generation_tokens_total") == sum(u.completion_tokens for u in usages) + chat.completion_tokens == 14
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(f"pagedllm:{histogram}_count") == 4, histogram
    assert delta("pagedllm:inter_token_latency_seconds_count") == 3 * 3 + 1
    assert "pagedllm:num_preemptions_total" in after


def test_prefix_cache_metrics_salt_and_reset(server: ServerProcess) -> None:
    client = server.client()
    prompt = "Tell me a story about a dragon who guards a library of ancient books. " * 6  # several full blocks

    def hits_after(**extra: Any) -> float:
        before = wait_idle(server)
        answer = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=2, **GREEDY, **extra)
        after = wait_idle(server)
        assert after["pagedllm:prefix_cache_queries_total"] - before["pagedllm:prefix_cache_queries_total"] == answer.usage.prompt_tokens
        hits = after["pagedllm:prefix_cache_hits_total"] - before["pagedllm:prefix_cache_hits_total"]
        assert answer.usage.prompt_tokens_details.cached_tokens == hits
        return hits

    hits_after()
    assert hits_after() >= 64
    salted = {"extra_body": {"cache_salt": "tenant-a"}}
    assert hits_after(**salted) == 0 and hits_after(**salted) >= 64
    assert httpx.post(server.url("/reset_prefix_cache")).status_code == 200
    assert hits_after() == 0
    chat = dict(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": prompt}], max_tokens=2, **GREEDY)
    client.chat.completions.create(**chat)
    assert client.chat.completions.create(**chat).usage.prompt_tokens_details.cached_tokens >= 64


# ---- shutdown and API key (their own short-lived server) --------------------------------------------
def test_api_key_then_sigterm_drains() -> None:
    proc = ServerProcess([*SMALL_SERVER_ARGS, "--shutdown-timeout", "4"], env={"PAGEDLLM_API_KEY": "sesame"})
    try:
        assert httpx.get(proc.url("/health")).status_code == 200
        assert httpx.get(proc.url("/version")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            response = httpx.get(proc.url("/v1/models"), headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(proc.url("/metrics")).status_code == 401
        with pytest.raises(APIStatusError) as info:
            proc.client(api_key="wrong").completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=1)
        assert info.value.status_code == 401
        assert proc.client(api_key="sesame").completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=1).choices

        async def streams_through_sigterm() -> list[tuple[str, str | None]]:
            aclient = proc.async_client(api_key="sesame")
            started = asyncio.Event()
            count = 0

            async def one(max_tokens: int) -> tuple[str, str | None]:
                nonlocal count
                stream = await aclient.completions.create(model="SmolLM2-135M-Instruct", prompt="Write an essay", max_tokens=max_tokens,
                                                          stream=True, **GREEDY, **NO_EOS)
                text, finish = "", None
                async for chunk in stream:
                    if not text:
                        count += 1
                        if count == 6:
                            started.set()
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                return text, finish

            async def terminate() -> None:
                await started.wait()
                proc.proc.send_signal(signal.SIGTERM)

            try:
                results = await asyncio.wait_for(asyncio.gather(*(one(m) for m in (2, 3, 240, 240, 240, 240)), terminate()), 60)
            finally:
                await aclient.close()
            return results[:-1]

        results = asyncio.run(streams_through_sigterm())
        assert [finish for _, finish in results[:2]] == ["length", "length"]
        assert all(finish in ("length", "abort") for _, finish in results[2:]) and any(f == "abort" for _, f in results[2:])
        assert proc.proc.wait(timeout=30) == 0, proc.logs()
        with pytest.raises(ProcessLookupError):  # nothing of its process group outlived it
            os.killpg(proc.proc.pid, 0)
    finally:
        proc.stop()


# ---- failure isolation, in process (tiny random model, token-id prompts, the engine core in its own process) ----
class FailingStepEngine(LLMEngine):
    """Its 5th step raises, as a device failure would (built in the core process: importable by name)."""

    def step(self) -> Any:
        self.num_steps = getattr(self, "num_steps", 0) + 1
        if self.num_steps == 5:
            raise RuntimeError("simulated device failure")
        return super().step()


class FailingAddEngine(LLMEngine):
    """A prompt starting with token 13 fails inside the engine, as an internal bug would."""

    def add_request(self, request_id: str, prompt: Any, *args: Any) -> None:
        if prompt["prompt_token_ids"][0] == 13:
            raise RuntimeError("simulated internal failure")
        super().add_request(request_id, prompt, *args)


def start_tiny_app(path: str, async_scheduling: bool, engine_cls: type[LLMEngine] = LLMEngine) -> tuple[Any, Any]:
    """The app with its engine core started (loaded, not yet read from: `run_in_app` starts the front)."""
    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_engine import AsyncLLM
    from pagedllm.entrypoints.openai.api_server import ServerSettings, build_app

    config = EngineConfig(model=path, skip_tokenizer_init=True, kv_cache_memory=16 << 20, async_scheduling=async_scheduling)
    async_engine = AsyncLLM.create(config, max_queued_samples=3, engine_cls=engine_cls)
    return build_app(async_engine, ServerSettings(model_names=["tiny"])), async_engine


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def tiny_app(tiny_models: dict[str, str], request: pytest.FixtureRequest) -> Iterator[Any]:
    yield start_tiny_app(tiny_models["llama"], request.param)


def run_in_app(tiny_app: Any, scenario: Any) -> Any:
    app, engine = tiny_app

    async def main() -> Any:
        engine.start()
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://tiny") as http:
                return await scenario(http, engine)
        finally:
            await engine.shutdown()

    return asyncio.run(asyncio.wait_for(main(), 120))


def sse_events(text: str) -> list[Any]:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    return [event if event == "[DONE]" else json.loads(event) for event in events]


async def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def test_generate_cancelled_frees_blocks_in_the_core(tiny_app: Any) -> None:
    """Closing a stream mid-way (what a client disconnect does) aborts the request in the core process, whose
    engine is then clean: no request left and every KV block back in the pool (checked there)."""
    from pagedllm.sampling_params import SamplingParams
    from tests.conftest import assert_clean

    async def scenario(http: httpx.AsyncClient, engine: Any) -> None:
        outputs = engine.generate("r1", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=100, ignore_eos=True))
        tokens = [len((await anext(outputs)).outputs[0].token_ids) for _ in range(3)]
        assert tokens == [1, 1, 1]  # DELTA outputs
        assert engine.stats.num_used_blocks > 0
        await outputs.aclose()
        await wait_until(lambda: not engine._streams and engine.stats.num_running == 0)
        assert engine.num_samples_in_flight == 0 and engine.stats.num_used_blocks == 0
        await engine.call_engine(assert_clean)  # runs in the core process, on its engine

    run_in_app(tiny_app, scenario)


def test_new_request_joins_the_next_step(tiny_app: Any) -> None:
    """The core takes messages between two steps: a request added while another decodes joins the step after the
    one running (its outputs one step later with async scheduling), not the end of the other's 400 tokens. The long
    request's outputs that arrive between the add and the new request's first token are those two or three steps,
    plus any the front had not read yet when it sent the add (a few on a loaded machine): far below 400."""
    from pagedllm.sampling_params import SamplingParams

    async def scenario(http: httpx.AsyncClient, engine: Any) -> None:
        params = SamplingParams(max_tokens=400, ignore_eos=True)
        long = await engine.add_request("long", {"prompt_token_ids": [5, 6, 7]}, params)
        for _ in range(5):
            await anext(long)
        backlog = long._queue.qsize()
        late = await engine.add_request("late", {"prompt_token_ids": [8, 9]}, SamplingParams(max_tokens=1))
        first = await anext(late)
        assert first.outputs[0].token_ids
        steps_between = long._queue.qsize() - backlog
        assert steps_between <= 8, steps_between
        engine.abort("long")

    run_in_app(tiny_app, scenario)


def test_engine_death_fails_in_flight_requests_and_health(tiny_models: dict[str, str]) -> None:
    async def scenario(http: httpx.AsyncClient, engine: Any) -> None:
        body = {"prompt": [5, 6, 7], "max_tokens": 50, "ignore_eos": True}
        streamed, plain = await asyncio.gather(
            http.post(COMPLETIONS, json={**body, "stream": True}), http.post(COMPLETIONS, json=body))
        events = sse_events(streamed.text)
        assert events[-1] == "[DONE]" and "error" in events[-2] and events[-2]["error"]["code"] == "engine_dead"
        assert plain.status_code == 503 and plain.json()["error"]["code"] == "engine_dead"
        assert (await http.get("/health")).status_code == 503
        assert (await http.post(COMPLETIONS, json=body)).status_code == 503

    run_in_app(start_tiny_app(tiny_models["llama"], True, FailingStepEngine), scenario)


def test_core_process_killed_fails_requests_and_health(tiny_models: dict[str, str]) -> None:
    """The engine core process dies (SIGKILL): in-flight streams end with an engine_dead error, /health turns 503."""
    async def scenario(http: httpx.AsyncClient, engine: Any) -> None:
        assert (await http.get("/health")).status_code == 200

        async def kill_soon() -> None:
            await wait_until(lambda: engine.stats.generation_tokens >= 3)
            engine.core.proc.kill()

        body = {"prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True, "stream": True}
        streamed, _ = await asyncio.gather(http.post(COMPLETIONS, json=body), kill_soon())
        events = sse_events(streamed.text)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_dead"
        assert (await http.get("/health")).status_code == 503
        assert (await http.post(COMPLETIONS, json={**body, "stream": False})).status_code == 503

    run_in_app(start_tiny_app(tiny_models["llama"], False), scenario)


def test_one_failing_request_spares_the_others(tiny_models: dict[str, str]) -> None:
    async def scenario(http: httpx.AsyncClient, engine: Any) -> None:
        good = {"prompt": [5, 6], "max_tokens": 8, "ignore_eos": True}
        results = await asyncio.gather(http.post(COMPLETIONS, json=good), http.post(COMPLETIONS, json={**good, "prompt": [13]}),
                                       http.post(COMPLETIONS, json={**good, "stream": True}))
        assert results[0].status_code == 200 and results[0].json()["usage"]["completion_tokens"] == 8
        assert results[1].status_code == 500 and results[1].json()["error"]["type"] == "server_error"
        assert sse_events(results[2].text)[-1] == "[DONE]"
        assert (await http.get("/health")).status_code == 200

    run_in_app(start_tiny_app(tiny_models["llama"], True, FailingAddEngine), scenario)


def test_over_capacity_gets_503(tiny_app: Any) -> None:
    async def scenario(http: httpx.AsyncClient, engine: Any) -> None:
        body = {"prompt": [5, 6], "max_tokens": 200, "ignore_eos": True}
        results = await asyncio.gather(*(http.post(COMPLETIONS, json=body) for _ in range(4)))
        codes = sorted(r.status_code for r in results)
        assert codes == [200, 200, 200, 503]
        assert next(r for r in results if r.status_code == 503).json()["error"]["code"] == "overloaded"
        assert engine.num_samples_in_flight == 0

    run_in_app(tiny_app, scenario)


def test_beam_search_in_app(tiny_app: Any, tiny_models: dict[str, str]) -> None:
    """AsyncLLM.beam_search gives LLM.beam_search's beams, the endpoint its n choices, and the engine ends clean."""
    from pagedllm import LLM
    from pagedllm.sampling_params import BeamSearchParams
    from tests.conftest import assert_clean

    prompt, params = {"prompt_token_ids": [5, 6, 7]}, BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True)
    expected = LLM(tiny_models["llama"], skip_tokenizer_init=True, kv_cache_memory=16 << 20).beam_search(prompt, params)

    async def scenario(http: httpx.AsyncClient, engine: Any) -> None:
        [output] = await engine.beam_search([prompt], params, "beams")
        assert [(s.tokens, s.finish_reason) for s in output.sequences] == [(s.tokens, s.finish_reason) for s in expected[0].sequences]
        body = {"prompt": [5, 6, 7], "n": 3, "max_tokens": 6, "ignore_eos": True, "use_beam_search": True}
        response = (await http.post(COMPLETIONS, json=body)).json()
        assert [c["index"] for c in response["choices"]] == [0, 1, 2] and response["usage"]["completion_tokens"] == 18
        assert not engine._streams and engine.num_samples_in_flight == 0
        await wait_until(lambda: engine.stats.num_running == 0)
        await engine.call_engine(assert_clean)

    run_in_app(tiny_app, scenario)
