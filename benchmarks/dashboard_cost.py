"""What the live dashboard costs the engine, measured directly rather than through noisy throughput runs on/off:
with N requests running (SmolLM2 on the CPU by default), the time of one snapshot in the engine core (taken between
two steps, so the core steps that much less), the time the front takes to build one SSE event from it, and the mean
step time. At 4 events per second (the page's rate), the core loses 4 x snapshot seconds per second: that fraction of
its throughput; the front's share is its own process's work, on another core when there is one.

    python benchmarks/dashboard_cost.py [--model DIR] [--num-requests 256]"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from pagedllm import SamplingParams
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.entrypoints.openai.dashboard import Dashboard, snapshot


class _Front:
    """The stand-in for AsyncLLM that the Dashboard reads: engine stats, and call_engine running in-process."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine

    @property
    def stats(self) -> object:
        return self.engine.get_stats()

    async def call_engine(self, fn: object) -> object:
        return fn(self.engine)  # type: ignore[operator]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-requests", type=int, default=256)
    args = parser.parse_args()
    engine = LLMEngine.from_kwargs(model=args.model, max_num_seqs=args.num_requests, max_model_len=512)
    params = SamplingParams(max_tokens=400, ignore_eos=True, temperature=0)
    for i in range(args.num_requests):
        engine.add_request(str(i), {"prompt_token_ids": [100 + i % 1000] * 64}, params.clone())
    while len(engine.scheduler.running) < args.num_requests:
        engine.step()
    steps = []
    for _ in range(10):
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    snaps = []
    for _ in range(20):
        start = time.perf_counter()
        snapshot(engine)
        snaps.append(time.perf_counter() - start)
    dashboard = Dashboard(_Front(engine))
    asyncio.run(dashboard._fetch())
    events = []
    for _ in range(20):
        start = time.perf_counter()
        json.dumps(dashboard._compose())
        events.append(time.perf_counter() - start)
    step, snap, event = (statistics.median(x) for x in (steps, snaps, events))
    rate = 1 / dashboard.interval
    print(f"{len(engine.scheduler.running)} running, {engine.kv_cache.num_blocks} KV blocks: step {1e3 * step:.1f} ms, "
          f"snapshot {1e3 * snap:.2f} ms, event {1e3 * event:.2f} ms")
    print(f"at {rate:.0f} events/s: the core loses {100 * rate * snap:.2f} % of its time "
          f"({100 * rate * (snap + event):.2f} % with the front's work on the same core)")


if __name__ == "__main__":
    main()
