"""The live dashboard behind `GET /dashboard`: a snapshot of the engine core's KV pool and queues, the front's
step stats, and TTFT / TPOT percentiles, pushed to the page as one SSE event per tick.

The engine runs in a process of its own (`engine/core.py`), so `snapshot` is a plain function that AsyncLLM's
existing `call_engine` channel pickles by name and runs in the core between two steps. It must stay cheap there:
numpy fills one byte per block, and the front compresses it. Snapshots are taken only while a page is connected,
at most once per tick whatever the number of pages; with no page open the dashboard costs one dict update per
output per step (for TTFT / TPOT), nothing else. This module imports only numpy and the standard library, as the
core imports it too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import zlib
from collections import Counter, deque
from typing import Any, AsyncIterator, Callable

import numpy as np

FREE, CACHED = 0, 1  # block states; 2..255: in use, by the colour of the request whose table holds it
MAX_ROWS = 200  # request rows sent per queue (the counts are always whole)
StepHook = Callable[[Any, list, float], None]


def colour(request_id: str) -> int:
    """A request's colour index, stable across ticks (so a request keeps its colour as others come and go)."""
    return 2 + zlib.crc32(request_id.encode()) % 254


def snapshot(engine: Any) -> dict[str, Any]:
    """The LLMEngine's block map (one byte per block) and its queues, read in the core between two steps."""
    kv, sched = engine.kv_cache, engine.scheduler
    blocks = np.zeros(kv.num_blocks, np.uint8)
    cached = kv.pool.cached  # hash -> block: free ones among them are prefix-cached, the rest are overwritten below
    if cached:
        blocks[np.fromiter(cached.values(), np.int64, len(cached))] = CACHED
    for request_id, table in kv.block_tables.items():  # read from the tables' numpy mirror: no list conversion
        start = kv.num_released.get(request_id, 0)  # sliding windows give leading blocks back
        blocks[kv.table_array[kv.table_rows[request_id], start:len(table)]] = colour(request_id)

    def row(r: Any, state: str) -> dict[str, Any]:
        held = len(kv.block_tables.get(r.request_id, ())) - kv.num_released.get(r.request_id, 0)
        return {"id": r.request_id, "state": state, "prompt": r.num_prompt_tokens,
                "computed": min(r.num_computed_tokens, r.num_prompt_tokens), "output": r.num_output_tokens,
                "max_tokens": r.max_tokens, "priority": r.priority, "colour": colour(r.request_id),
                "lora": None if r.lora_request is None else r.lora_request.lora_name, "blocks": held}

    running, waiting = list(sched.running), list(sched.waiting)
    counts: Counter[tuple[str, str, str]] = Counter()  # (by_lora | by_priority, adapter | priority, state)
    for state, requests in (("running", running), ("waiting", waiting)):
        for r in requests:
            counts["by_lora", r.lora_request.lora_name if r.lora_request else "base", state] += 1
            counts["by_priority", str(r.priority), state] += 1
    return {
        "blocks": blocks.tobytes(), "block_size": kv.block_size, "evictions": kv.pool.num_evictions, "counts": counts,
        "requests": [row(r, "running") for r in running[:MAX_ROWS]]
        + [row(r, "preempted" if r.num_preemptions else "waiting") for r in waiting[:MAX_ROWS]],
    }


def _percentiles(samples: deque[tuple[float, float]], since: float) -> dict[str, float | None]:
    while samples and samples[0][0] < since:
        samples.popleft()
    values = sorted(v for _, v in samples)
    at = lambda q: values[min(len(values) - 1, int(q * len(values)))] if values else None  # noqa: E731
    return {"p50": at(0.5), "p99": at(0.99), "n": len(values)}


class Dashboard:
    """One per server: the latency samples fed from each step, and the event shared by every connected page."""

    def __init__(self, engine: Any, interval: float = 0.25, window: float = 300.0) -> None:
        self.engine, self.interval, self.window = engine, interval, window
        self.clients = 0
        self._ttft: deque[tuple[float, float]] = deque(maxlen=20000)  # (time, seconds), the last `window` seconds
        self._tpot: deque[tuple[float, float]] = deque(maxlen=20000)
        self._tokens: dict[tuple[str, int], int] = {}  # (request, sample) -> tokens so far, while it runs
        self._ticks: deque[tuple[float, int, int]] = deque(maxlen=16)  # (time, prompt tokens, generated), per tick
        self._call: asyncio.Task[None] | None = None
        self._snapshot: dict[str, Any] | None = None
        self._error: str | None = None
        self._event, self._event_time = "", 0.0

    def hook(self, inner: StepHook | None) -> StepHook:
        """`inner` (the metrics' step hook), then this dashboard's: what the engine front calls after every step."""
        def on_step(stats: Any, outputs: list, now: float) -> None:
            if inner is not None:
                inner(stats, outputs, now)
            self.record(outputs, now)
        return on_step

    def record(self, outputs: list, now: float) -> None:
        """TTFT and TPOT from one step's DELTA outputs, timed as metrics.py times them (front clock, engine stamps)."""
        for output in outputs:
            m = getattr(output, "metrics", None)
            if m is None:  # pooling outputs
                continue
            for c in output.outputs:
                key = (output.request_id, c.index)
                if c.token_ids:
                    seen = self._tokens.get(key)
                    if seen is None:
                        self._ttft.append((now, now - m.arrival_time))
                    self._tokens[key] = (seen or 0) + len(c.token_ids)
                if c.finish_reason is not None:
                    n = self._tokens.pop(key, 0)
                    if n >= 2 and m.first_token_time is not None and m.last_token_time is not None:
                        self._tpot.append((now, (m.last_token_time - m.first_token_time) / (n - 1)))

    async def stream(self, stop: Callable[[], bool]) -> AsyncIterator[str]:
        """SSE lines, one event every `interval` until the client leaves or `stop()` (the server drains)."""
        self.clients += 1
        try:
            tick = time.monotonic()
            while not stop():
                tick = max(tick + self.interval, time.monotonic())
                yield f"data: {await self._shared_event(tick)}\n\n"
                await asyncio.sleep(max(0.0, tick - time.monotonic()))
        finally:
            self.clients -= 1

    async def _shared_event(self, deadline: float) -> str:
        """The current event, built at most once per half tick whatever the number of pages. The engine's snapshot
        is awaited until `deadline` (a long step delays it); past that the last one goes out again, with its age."""
        if time.monotonic() - self._event_time < self.interval / 2:
            return self._event
        if self._call is None or self._call.done():
            self._call = asyncio.ensure_future(self._fetch())
        try:
            await asyncio.wait_for(asyncio.shield(self._call), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            pass
        self._event, self._event_time = json.dumps(self._compose()), time.monotonic()
        return self._event

    async def _fetch(self) -> None:
        """The snapshot of every engine core (data-parallel replicas side by side in one map)."""
        replicas = getattr(self.engine, "replicas", [self.engine])
        try:
            parts = await asyncio.gather(*(r.call_engine(snapshot) for r in replicas))
        except Exception as error:  # noqa: BLE001 - the engine has died: the page says so, stats stay
            self._snapshot, self._error = None, f"{type(error).__name__}: {error}"
            return
        merged: dict[str, Any] = {"by_lora": {}, "by_priority": {}}
        for (group, key, state), n in sorted(sum((p["counts"] for p in parts), Counter()).items()):
            merged[group].setdefault(key, {"running": 0, "waiting": 0})[state] = n
        self._snapshot, self._error = dict(
            merged, blocks=b"".join(p["blocks"] for p in parts), block_size=parts[0]["block_size"], time=time.time(),
            evictions=sum(p["evictions"] for p in parts),
            requests=[dict(row, replica=i) for i, p in enumerate(parts) for row in p["requests"]]), None

    def _compose(self) -> dict[str, Any]:
        stats, now, wall = self.engine.stats, time.monotonic(), time.time()
        self._ticks.append((now, stats.prompt_tokens, stats.generation_tokens))
        t0, p0, g0 = next((t for t in self._ticks if now - t[0] <= 2.0), self._ticks[-1])  # rates over ~2 s
        dt = max(now - t0, 1e-9)
        snap, pool = self._snapshot, None
        if snap is not None:
            pool = {"num_blocks": len(snap["blocks"]), "block_size": snap["block_size"], "age": wall - snap["time"],
                    "evictions": snap["evictions"], "map": base64.b64encode(zlib.compress(snap["blocks"], 1)).decode()}
        return {
            "time": wall, "running": stats.num_running, "waiting": stats.num_waiting, "kv_usage": stats.kv_cache_usage,
            "preemptions": stats.num_preemptions,
            "prefix_hit_rate": stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else None,
            "throughput": {"prompt": (stats.prompt_tokens - p0) / dt if now > t0 else 0.0,
                           "generation": (stats.generation_tokens - g0) / dt if now > t0 else 0.0},
            "ttft": _percentiles(self._ttft, wall - self.window), "tpot": _percentiles(self._tpot, wall - self.window),
            "loras": {"running": list(stats.running_loras), "waiting": list(stats.waiting_loras)},
            "pool": pool, "requests": snap["requests"] if snap else [], "by_lora": snap["by_lora"] if snap else {},
            "by_priority": snap["by_priority"] if snap else {}, "error": self._error,
        }
