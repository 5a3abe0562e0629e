"""Disaggregated prefill over HTTP (issue 30): a producer `pagedllm serve` (kv_role kv_producer), a consumer (kv_consumer)
and `pagedllm proxy` in front of them, all real subprocesses on SmolLM2 (float32, CPU).

Greedy answers through the proxy (one request, eight at once; completions and chat; streamed and not) equal the
producer's own answers to the same requests sent to it directly before any transfer, as to a plain server; the consumer
counts the blocks it pulled as external prefix-cache hits; a stream the client drops frees the consumer's KV; with the
producer killed mid-run, requests still complete with the same text (the consumer prefills them itself)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedllm.entrypoints.proxy import Pool, build_proxy
from tests.server_utils import ServerProcess, free_port

MAX_TOKENS = 12
STORY = "Once upon a time, in a small village by the sea, there lived an old fisherman and his three clever daughters, who"


def kv_config(role: str) -> str:
    # Each role listens on its own port; a small host tier (the TcpConnector's default is 4 GiB).
    return json.dumps({"kv_connector": "TcpConnector", "kv_role": role, "kv_port": free_port(),
                       "kv_connector_extra_config": {"kv_offload_bytes": 64 << 20}})


@pytest.fixture(scope="module")
def cluster(smollm2: str) -> Iterator[dict[str, ServerProcess]]:
    """producer, consumer (started at once) and the proxy in front of them."""
    args = [smollm2, "--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory", str(128 << 20)]
    with ThreadPoolExecutor(2) as pool:
        futures = {role: pool.submit(ServerProcess, [*args, "--kv-transfer-config", kv_config(f"kv_{role}")])
                   for role in ("producer", "consumer")}
        procs = {role: future.result() for role, future in futures.items()}
    try:
        procs["proxy"] = ServerProcess(["--prefill", procs["producer"].base_url, "--decode", procs["consumer"].base_url],
                                       command="proxy", start_timeout=60)
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def body(kind: str, prompt: str, stream: bool, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    text = {"prompt": prompt} if kind == "completion" else {"messages": [{"role": "user", "content": prompt}]}
    return {**text, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": stream}


async def ask(client: httpx.AsyncClient, base: str, kind: str, prompt: str, stream: bool) -> str:
    """The first choice's text, collected from the stream's chunks when streamed."""
    path = "/v1/completions" if kind == "completion" else "/v1/chat/completions"
    if not stream:
        response = await client.post(base + path, json=body(kind, prompt, False))
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice["text"] if kind == "completion" else choice["message"]["content"]
    events = []
    async with client.stream("POST", base + path, json=body(kind, prompt, True)) as response:
        assert response.status_code == 200, await response.aread()
        events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    choices = [choice for event in events[:-1] for choice in json.loads(event)["choices"]]
    return "".join(choice["text"] if kind == "completion" else choice["delta"].get("content") or "" for choice in choices)


def ask_all(base: str, requests: list[tuple[str, str, bool]]) -> list[str]:
    """Every (kind, prompt, stream) request at once."""
    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            return list(await asyncio.gather(*(ask(client, base, *request) for request in requests)))

    return asyncio.run(run())


def metrics(server: ServerProcess) -> dict[str, float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(server.url("/metrics")).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("model_name", "le"))
            samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return samples


# (kind, prompt, stream): each test's own prompts, so that each pulls its prompts' blocks afresh.
SINGLE = [(kind, f"{STORY} ({i}, {kind})", stream) for i, (kind, stream) in
          enumerate([(k, s) for k in ("completion", "chat") for s in (False, True)])]
CONCURRENT = [(kind, f"{STORY} [{i}, {kind}]", i % 2 == 1) for i, kind in enumerate(["completion", "chat"] * 4)]
KILLED = [(kind, f"{STORY} <{i}, {kind}>", i % 2 == 0) for i, kind in enumerate(["chat", "completion"] * 2)]


@pytest.fixture(scope="module")
def expected(cluster: dict[str, ServerProcess]) -> dict[tuple[str, str], str]:
    """The producer's own answers to every request (no kv_transfer_params: a plain server), all at once, before the
    proxy sends it any of their prompts."""
    requests = [(kind, prompt, False) for kind, prompt, _ in SINGLE + CONCURRENT + KILLED]
    return {request[:2]: text for request, text in zip(requests, ask_all(cluster["producer"].base_url, requests))}


def test_server_kv_transfer_params(cluster: dict[str, ServerProcess]) -> None:
    producer, consumer = cluster["producer"], cluster["consumer"]
    ask_producer = {**body("completion", "Hello", False, 1), "kv_transfer_params": {"do_remote_decode": True}}
    answer = httpx.post(producer.url("/v1/completions"), json=ask_producer, timeout=60).json()
    assert answer["kv_transfer_params"]["do_remote_prefill"] is True
    assert answer["kv_transfer_params"]["remote_host"] == "127.0.0.1" and answer["kv_transfer_params"]["remote_port"] > 0
    plain = httpx.post(producer.url("/v1/completions"), json=body("completion", "Hello", False, 1), timeout=60).json()
    assert "kv_transfer_params" not in plain
    refused = httpx.post(consumer.url("/v1/completions"), json=ask_producer, timeout=60)  # the consumer produces nothing
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "kv_transfer_params", refused.text
    assert "kv_producer" in refused.json()["error"]["message"]


def test_single_requests_equal_plain_server(cluster: dict[str, ServerProcess], expected: dict[tuple[str, str], str]) -> None:
    for request in SINGLE:
        assert ask_all(cluster["proxy"].base_url, [request]) == [expected[request[:2]]], request
    assert httpx.get(cluster["proxy"].url("/v1/models")).json()["data"][0]["id"]


def test_concurrent_requests_equal_plain_server(cluster: dict[str, ServerProcess], expected: dict[tuple[str, str], str]) -> None:
    assert ask_all(cluster["proxy"].base_url, CONCURRENT) == [expected[request[:2]] for request in CONCURRENT]
    # The consumer took the prompts' full blocks from the producer instead of computing them.
    assert metrics(cluster["consumer"])["pagedllm:external_prefix_cache_hits_total"] > 0


def test_dropped_stream_frees_consumer_kv(cluster: dict[str, ServerProcess]) -> None:
    consumer = cluster["consumer"]
    aborts = "pagedllm:request_success_total{finished_reason=abort}"
    before = metrics(consumer)[aborts]
    with httpx.stream("POST", cluster["proxy"].url("/v1/completions"), timeout=60,
                      json=body("completion", f"{STORY} (a long one)", True, max_tokens=400)) as response:
        chunks = response.iter_lines()
        for _ in range(6):  # three events: the decode has started
            next(chunks)
    deadline = time.monotonic() + 15
    while (m := metrics(consumer))["pagedllm:kv_cache_usage_perc"] > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert m["pagedllm:kv_cache_usage_perc"] == 0 and m["pagedllm:num_requests_running"] == 0
    assert m[aborts] == before + 1  # aborted, not run to its 400 tokens


def test_producer_killed_mid_run(cluster: dict[str, ServerProcess], expected: dict[tuple[str, str], str]) -> None:
    """The cluster's last test: kills the producer while requests go through the proxy; they, and those after,
    complete the same."""
    producer, texts = cluster["producer"], [expected[request[:2]] for request in KILLED]

    async def run() -> list[str]:
        async def later(delay: float, request: tuple[str, str, bool]) -> str:
            await asyncio.sleep(delay)
            return await ask(client, cluster["proxy"].base_url, *request)

        async with httpx.AsyncClient(timeout=120) as client:  # one every 0.2 s; the producer dies at 0.3 s
            pending = asyncio.gather(*(later(0.2 * i, request) for i, request in enumerate(KILLED)))
            await asyncio.sleep(0.3)
            os.killpg(producer.proc.pid, signal.SIGKILL)  # the server and its engine core
            return list(await pending)

    assert asyncio.run(run()) == texts
    producer.proc.wait(10)
    assert ask_all(cluster["proxy"].base_url, KILLED[:2]) == texts[:2]
    assert httpx.get(cluster["proxy"].url("/health")).status_code == 503  # no prefill instance answers


# ---- the proxy's policy, in process: fake instances behind an httpx.MockTransport ------------------------------------
def test_pool_least_in_flight_then_in_turn() -> None:
    pool = Pool(["http://a", "http://b/", "http://c"])
    assert [pool.acquire() for _ in range(3)] == ["http://a", "http://b", "http://c"]
    pool.release("http://b")
    assert pool.acquire() == "http://b"  # the only one with nothing in flight
    for url in ("http://a", "http://b", "http://c"):
        pool.release(url)
    assert [pool.acquire() for _ in range(3)] == ["http://c", "http://a", "http://b"]  # all equal: in turn from b
    pool.release("http://a", down=True)  # refused a connection: skipped while others are up
    assert pool.acquire() == "http://c" and pool.acquire(only_up=True) in ("http://b", "http://c")


def test_proxy_prefill_failures() -> None:
    """Prefill first (max_tokens 1, not streamed, do_remote_decode), then decode with the producer's params; a prefill
    that fails sends the request to decode without them (a refused connection also rests that instance); a 4xx goes
    back to the client; a stream's bytes come through unchanged."""
    calls: list[tuple[str, dict[str, Any]]] = []
    prefill_mode = ["ok"]
    stream_bytes = b'data: {"choices": [{"text": "x"}]}\n\ndata: [DONE]\n\n'

    def upstream(request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.content)
        calls.append((request.url.host, payload))
        if request.url.host == "prefill":
            if prefill_mode[0] == "refused":
                raise httpx.ConnectError("refused", request=request)
            if prefill_mode[0] == "ok":
                return httpx.Response(200, json={"kv_transfer_params": {"do_remote_prefill": True, "remote_port": 7}})
            return httpx.Response(int(prefill_mode[0]), json={"error": {"message": f"prefill says {prefill_mode[0]}"}})
        if payload.get("stream"):
            return httpx.Response(200, content=stream_bytes, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={"choices": [{"text": "done"}]})

    app = build_proxy(["http://prefill"], ["http://decode"], transport=httpx.MockTransport(upstream))

    async def post(path: str, payload: dict[str, Any]) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
            return await client.post(path, json=payload)

    def run(mode: str, path: str, payload: dict[str, Any]) -> tuple[httpx.Response, list[tuple[str, dict[str, Any]]]]:
        prefill_mode[0] = mode
        calls.clear()
        return asyncio.run(post(path, payload)), list(calls)

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "stream": True,
            "stream_options": {"include_usage": True}}
    answer, seen = run("ok", "/v1/chat/completions", chat)
    assert answer.content == stream_bytes and answer.headers["content-type"].startswith("text/event-stream")
    assert seen[0] == ("prefill", {"messages": chat["messages"], "max_tokens": 1, "max_completion_tokens": 1,
                                   "stream": False, "kv_transfer_params": {"do_remote_decode": True}})
    assert seen[1] == ("decode", {**chat, "kv_transfer_params": {"do_remote_prefill": True, "remote_port": 7}})
    completion = {"prompt": "hi", "max_tokens": 9}
    answer, seen = run("400", "/v1/completions", completion)
    assert answer.status_code == 400 and answer.json()["error"]["message"] == "prefill says 400" and len(seen) == 1
    for mode in ("500", "503", "refused"):
        answer, seen = run(mode, "/v1/completions", completion)
        assert answer.json() == {"choices": [{"text": "done"}]} and seen == [("prefill", seen[0][1]), ("decode", completion)]
        answer, seen = run("ok", "/v1/completions", completion)  # a dead (503) or refusing instance rests for a while
        assert answer.status_code == 200 and len(seen) == (1 if mode != "500" else 2)
        app.state.prefills.down_until["http://prefill"] = 0.0


def test_proxy_streamed_exchange() -> None:
    """An instance whose params say "streamed" (the IpcConnector) gets its later requests at the same time as the
    decode instance, both with one new transfer id; a prefill that then fails or refuses costs the client nothing."""
    calls: list[tuple[str, dict[str, Any]]] = []
    prefill_status = [200]
    streamed = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": 7, "streamed": True}

    async def upstream(request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.content)
        calls.append((request.url.host, payload))
        if request.url.host == "prefill":
            await asyncio.sleep(0.05)  # the decode request goes out meanwhile
            if prefill_status[0] != 200:
                return httpx.Response(prefill_status[0], json={"error": {"message": "no"}})
            return httpx.Response(200, json={"kv_transfer_params": streamed})
        return httpx.Response(200, json={"choices": [{"text": "done"}]})

    app = build_proxy(["http://prefill"], ["http://decode"], transport=httpx.MockTransport(upstream))

    async def post(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy") as client:
            answers = [await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 9}) for _ in range(n)]
            await asyncio.sleep(0.1)  # the last prefill, still running after its decode answered
            return answers

    answers = asyncio.run(post(3))
    assert all(a.json() == {"choices": [{"text": "done"}]} for a in answers)
    assert sorted(host for host, _ in calls) == ["decode"] * 3 + ["prefill"] * 3
    first, later = calls[:2], calls[2:]
    assert first[0][1]["kv_transfer_params"] == {"do_remote_decode": True}  # not known yet: one after the other
    assert first[1][1]["kv_transfer_params"] == streamed
    for prefill, decode in (sorted(later[i : i + 2], key=lambda c: c[0] != "prefill") for i in (0, 2)):
        transfer_id = prefill[1]["kv_transfer_params"]["transfer_id"]
        assert prefill[1]["kv_transfer_params"] == {"do_remote_decode": True, "transfer_id": transfer_id}
        assert decode[1]["kv_transfer_params"] == {**streamed, "transfer_id": transfer_id}
    assert later[0][1]["kv_transfer_params"]["transfer_id"] != later[2][1]["kv_transfer_params"]["transfer_id"]
    for status in (400, 500):
        prefill_status[0] = status
        calls.clear()
        assert asyncio.run(post(1))[0].json() == {"choices": [{"text": "done"}]}
        assert sorted(host for host, _ in calls) == ["decode", "prefill"]
