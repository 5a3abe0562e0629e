"""The live dashboard (GET /dashboard, /dashboard/stream) on a real `pagedllm serve` (SmolLM2, small cache): the page
is served behind the API key, the stream ticks at >= 2 Hz and shows the block map and queues under load and empty
after; and, where a Chromium can be launched, the page itself draws them."""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import httpx
import pytest

from tests.server_utils import REPO_ROOT, SMALL_SERVER_ARGS, ServerProcess

KEY = "dashboard-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EVENT_KEYS = {"time", "running", "waiting", "kv_usage", "preemptions", "prefix_hit_rate", "throughput", "ttft", "tpot",
              "loras", "pool", "requests", "by_lora", "by_priority", "error"}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess([*SMALL_SERVER_ARGS, "--api-key", KEY])
    yield proc
    assert proc.stop() == 0, proc.logs()


class Load:
    """`n` concurrent streamed completions (one shared prompt head, so finished requests leave prefix-cached blocks),
    each read until it ends or `stop` closes it (the server then aborts it): the load lasts as long as a test needs."""

    def __init__(self, server: ServerProcess, n: int = 4, max_tokens: int = 150) -> None:
        self.server, self.max_tokens, self.stopping = server, max_tokens, threading.Event()
        self.pool = ThreadPoolExecutor(n)
        self.futures = [self.pool.submit(self._one, i) for i in range(n)]

    def _one(self, i: int) -> int:
        body = {"prompt": "Once upon a time, in a land far away, there lived a curious fox. " * 3 + str(i),
                "max_tokens": self.max_tokens, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", self.server.url("/v1/completions"), json=body, headers=AUTH, timeout=120) as response:
            for _ in response.iter_lines():
                if self.stopping.is_set():
                    break
        return response.status_code

    def stop(self) -> None:
        self.stopping.set()
        assert all(f.result() == 200 for f in self.futures)
        self.pool.shutdown()


def block_states(event: dict[str, Any]) -> bytes:
    """One byte per block: 0 free, 1 prefix-cached, >= 2 in use (the holder's colour); b"\\0" before the first snapshot."""
    return zlib.decompress(base64.b64decode(event["pool"]["map"])) if event["pool"] else b"\0"


def read_events(server: ServerProcess, until: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0) -> list[tuple[float, dict]]:
    """Events (with their arrival times) from one stream connection, until `until(events)` holds."""
    events: list[tuple[float, dict]] = []
    deadline = time.monotonic() + timeout
    with httpx.stream("GET", server.url("/dashboard/stream"), headers=AUTH, timeout=10) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append((time.monotonic(), json.loads(line[len("data: "):])))
                if until([e for _, e in events]) or time.monotonic() > deadline:
                    return events
    return events


def test_page_is_open_and_its_stream_behind_the_api_key(server: ServerProcess) -> None:
    page = httpx.get(server.url("/dashboard"), headers=AUTH)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('id="blocks"', 'id="plot-throughput"', 'id="requests"', "/stream"):
        assert needle in page.text
    assert "<script src" not in page.text and "<link" not in page.text  # self-contained: nothing fetched elsewhere
    assert httpx.get(server.url("/dashboard")).status_code == 200  # the page alone: it holds no data
    assert httpx.get(server.url("/dashboard/stream")).status_code == 401


def test_stream_shows_blocks_and_queues_under_load_then_frees(server: ServerProcess) -> None:
    load = Load(server)
    try:
        busy = lambda events: len(events) >= 3 and any(  # noqa: E731  (every request a few tokens in: TTFT, TPOT)
            max(block_states(e)) >= 2 and sum(r["output"] >= 2 for r in e["requests"]) == 4 for e in events[2:])
        events = read_events(server, busy)
        assert busy([e for _, e in events]), events[-1][1]
    finally:
        load.stop()
    times = [t for t, _ in events]
    assert (times[-1] - times[0]) / (len(times) - 1) <= 0.5  # >= 2 Hz, even with the engine stepping
    during = next(e for _, e in events[2:] if e["requests"] and max(block_states(e)) >= 2)
    assert set(during) == EVENT_KEYS and during["error"] is None
    assert during["pool"]["num_blocks"] == len(block_states(during))
    row = next(r for r in during["requests"] if r["state"] == "running")
    assert row["prompt"] > 0 and row["max_tokens"] == 150 and row["blocks"] > 0
    assert row["colour"] in block_states(during)  # the request's blocks carry its colour
    assert during["by_priority"]["0"]["running"] >= 1 and "base" in during["by_lora"]

    idle = lambda events: events[-1]["running"] == 0 and not events[-1]["requests"] and max(block_states(events[-1])) < 2  # noqa: E731
    after = read_events(server, idle)[-1][1]
    assert idle([after]), after
    assert 1 in block_states(after)  # the finished prompts' full blocks stay, prefix-cached
    assert after["ttft"]["n"] >= 4 and after["ttft"]["p50"] > 0 and after["tpot"]["n"] >= 4 and after["tpot"]["p99"] > 0


def test_no_dashboard_is_404() -> None:
    import asyncio

    import argparse

    from pagedllm.entrypoints.openai.api_server import ServerSettings, build_app
    from pagedllm.entrypoints.openai.cli import add_serve_parser

    assert add_serve_parser(argparse.ArgumentParser().add_subparsers()).parse_args(["--no-dashboard"]).no_dashboard
    engine = SimpleNamespace(config=SimpleNamespace(max_model_len=256), tokenizer=None, vocab_size=10, on_step=None)

    async def get(app: Any, path: str) -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            return (await http.get(path)).status_code

    off = build_app(engine, ServerSettings(model_names=["m"], dashboard=False))  # type: ignore[arg-type]
    on = build_app(engine, ServerSettings(model_names=["m"]))  # type: ignore[arg-type]
    assert asyncio.run(get(off, "/dashboard")) == 404 and asyncio.run(get(off, "/dashboard/stream")) == 404
    assert asyncio.run(get(on, "/dashboard")) == 200


def test_snapshot_and_data_parallel_merge() -> None:
    """`snapshot` on engines of two replicas (real KV managers), merged into one event, as a DP server's page sees it."""
    import asyncio

    from pagedllm.core.kv_cache import KVCacheManager
    from pagedllm.engine.llm_engine import EngineStats
    from pagedllm.engine.request import Request
    from pagedllm.entrypoints.openai.dashboard import CACHED, FREE, Dashboard, colour
    from pagedllm.sampling_params import SamplingParams

    def engine(tag: str) -> SimpleNamespace:
        kv = KVCacheManager(8, 4)
        running = Request(f"{tag}-run", None, list(range(10)), SamplingParams(max_tokens=5), 5, num_computed_tokens=10)
        waiting = Request(f"{tag}-wait", None, [1, 2], SamplingParams(), 16, priority=2, lora_request=SimpleNamespace(lora_name="ad"))
        kv.allocate_slots(running.request_id, 10)  # blocks 0-2
        kv.pool.cache(7, b"h")  # free, with a hash: prefix-cached
        return SimpleNamespace(kv_cache=kv, scheduler=SimpleNamespace(running=[running], waiting=[waiting]))

    async def call_engine(e: SimpleNamespace, fn: Any) -> Any:
        return fn(e)

    replicas = [SimpleNamespace(call_engine=lambda fn, e=engine(tag): call_engine(e, fn)) for tag in ("a", "b")]
    stats = EngineStats(num_running=2, num_waiting=2, kv_cache_usage=0.375, num_used_blocks=6, num_preemptions=0,
                        prompt_tokens=20, generation_tokens=0, prefix_cache_queries=0, prefix_cache_hits=0)
    dashboard = Dashboard(SimpleNamespace(replicas=replicas, stats=stats), interval=0.05)

    async def two_events() -> list[dict[str, Any]]:
        stream, events = dashboard.stream(lambda: False), []
        async for line in stream:
            events.append(json.loads(line.removeprefix("data: ")))
            if len(events) == 2:
                await stream.aclose()
        return events

    event = asyncio.run(two_events())[-1]
    assert dashboard.clients == 0  # a closed stream leaves
    states = block_states(event)
    assert states == bytes([colour("a-run")] * 3 + [FREE] * 4 + [CACHED] + [colour("b-run")] * 3 + [FREE] * 4 + [CACHED])
    assert [(r["id"], r["state"], r["replica"], r["computed"], r["blocks"]) for r in event["requests"]] == [
        ("a-run", "running", 0, 10, 3), ("a-wait", "waiting", 0, 0, 0), ("b-run", "running", 1, 10, 3), ("b-wait", "waiting", 1, 0, 0)]
    assert event["by_lora"] == {"ad": {"running": 0, "waiting": 2}, "base": {"running": 2, "waiting": 0}}
    assert event["by_priority"] == {"0": {"running": 2, "waiting": 0}, "2": {"running": 0, "waiting": 2}}


def _browser(playwright: Any) -> Any:
    try:
        return playwright.chromium.launch()
    except Exception:  # noqa: BLE001 - playwright's own build is not installed: try the system's
        path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if path is None:
            pytest.skip("no Chromium to launch (pip install playwright; apt-get install chromium)")
        return playwright.chromium.launch(executable_path=path)


def test_page_draws_in_a_browser(server: ServerProcess, tmp_path: Any) -> None:
    """Set PAGEDLLM_DASHBOARD_SCREENSHOT=1 to refresh docs/dashboard.png."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, extra_http_headers=AUTH)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.url("/dashboard"))
            load = Load(server)
            try:
                # The map is drawn after the table (it is inflated first): wait for both to show the load.
                page.wait_for_function("document.querySelectorAll('#requests tr').length === 4 && "
                                       "/ [1-9][0-9]* in use/.test(document.getElementById('pool-info').textContent)", timeout=30000)
                data_url = "(id) => document.getElementById(id).toDataURL()"
                busy_map, first_plot = page.evaluate(data_url, "blocks"), page.evaluate(data_url, "plot-throughput")
                ticks = int(page.inner_text("#c-ticks"))
                page.wait_for_function(f"(before) => ({data_url})('plot-throughput') !== before", arg=first_plot, timeout=10000)
                assert "in use" in page.inner_text("#pool-info") and int(page.inner_text("#c-running")) > 0
                shot = os.path.join(REPO_ROOT, "docs", "dashboard.png") if os.environ.get("PAGEDLLM_DASHBOARD_SCREENSHOT") \
                    else str(tmp_path / "dashboard.png")
                page.screenshot(path=shot, full_page=True)
            finally:
                load.stop()
            # The aborted requests' blocks go back to the pool: the map changes and the table empties.
            page.wait_for_function("document.querySelectorAll('#requests tr').length === 0", timeout=20000)
            page.wait_for_function(f"(before) => ({data_url})('blocks') !== before", arg=busy_map, timeout=5000)
            assert int(page.inner_text("#c-ticks")) >= ticks + 2
            assert not errors, errors
        finally:
            browser.close()
