"""ServerMetrics fed directly with DELTA outputs, as AsyncLLM's step hook feeds it: no server, no model."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedllm.engine.llm_engine import EngineStats
from pagedllm.metrics import ServerMetrics
from pagedllm.outputs import CompletionOutput, RequestMetrics, RequestOutput

STATS = EngineStats(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_used_blocks=0, num_preemptions=0,
                    prompt_tokens=0, generation_tokens=0, prefix_cache_queries=0, prefix_cache_hits=0)
TPOT = "pagedllm:request_time_per_output_token_seconds"


def samples(metrics: ServerMetrics) -> dict[str, float]:
    text = metrics.render()[0].decode()
    families = text_string_to_metric_families(text)
    # Keyed by name and the labels other than model_name: `..._bucket0.05`, `..._totallength`.
    return {s.name + "".join(v for k, v in s.labels.items() if k != "model_name"): s.value
            for f in families for s in f.samples}


def output(request_id: str, tokens: dict[int, int], finished: set[int],
           metrics: RequestMetrics | None) -> RequestOutput:
    """One step's DELTA output: `tokens` new tokens for each sample index, `finished` the samples ending now."""
    completions = [CompletionOutput(i, "", list(range(n)), None, None, "length" if i in finished else None)
                   for i, n in tokens.items()]
    return RequestOutput(request_id, None, [1, 2, 3], None, completions, finished=bool(finished), metrics=metrics)


def test_request_time_per_output_token() -> None:
    metrics = ServerMetrics("tiny", 256)
    # 5 tokens over 3 steps; the engine stamped the first at t=10.0 and the last at t=10.2: 50 ms per token.
    stamps = RequestMetrics(arrival_time=9.0, first_scheduled_time=9.5)
    stamps.first_token_time = stamps.last_token_time = 10.0
    metrics.record_step(STATS, [output("a", {0: 1}, set(), stamps)], now=10.01)
    stamps.last_token_time = 10.1
    metrics.record_step(STATS, [output("a", {0: 2}, set(), stamps)], now=10.11)
    stamps.last_token_time = 10.2
    metrics.record_step(STATS, [output("a", {0: 2}, {0}, stamps)], now=10.3)  # the hook's clock is not used
    # Left out: one token only; no engine timestamps; an aborted request that never produced a token.
    one = RequestMetrics(arrival_time=9.0, first_token_time=10.0, last_token_time=10.0)
    metrics.record_step(STATS, [output("b", {0: 1}, {0}, one), output("c", {0: 3}, {0}, None),
                                output("d", {0: 0}, {0}, RequestMetrics(arrival_time=9.0))], now=10.4)
    values = samples(metrics)
    assert values[TPOT + "_count"] == 1
    assert values[TPOT + "_sum"] == pytest.approx(0.05)
    assert values[TPOT + "_bucket0.05"] == 1 and values[TPOT + "_bucket0.025"] == 0  # vLLM's TPOT buckets
    assert values["pagedllm:request_success_totallength"] == 4


def test_request_time_per_output_token_n_samples() -> None:
    """n = 2: the timestamps are the first sample's, so only that sample is observed."""
    metrics = ServerMetrics("tiny", 256)
    stamps = RequestMetrics(arrival_time=0.0, first_token_time=1.0, last_token_time=1.0)
    metrics.record_step(STATS, [output("r", {0: 1, 1: 1}, set(), stamps)], now=1.0)
    stamps.last_token_time = 1.3
    metrics.record_step(STATS, [output("r", {0: 3, 1: 2}, {1}, stamps)], now=1.3)  # sample 1 ends first
    assert samples(metrics)[TPOT + "_count"] == 0
    stamps.last_token_time = 1.4
    metrics.record_step(STATS, [output("r", {0: 1}, {0}, stamps)], now=1.4)
    values = samples(metrics)
    assert values[TPOT + "_count"] == 1 and values[TPOT + "_sum"] == pytest.approx(0.4 / 4)
