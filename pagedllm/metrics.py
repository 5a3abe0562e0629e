"""Prometheus metrics with vLLM's names under a `pagedllm:` prefix, in a registry per server or per offline `LLM`.

The server feeds them from AsyncLLM's step hook on the event loop (each step message of the engine core) with the
DELTA outputs of each step, counting the way vLLM v1 does: a sample's prompt tokens count once, when it produces its
first token (so preemption does not count them twice); each sample of an n > 1 request is one finished request, as
in vLLM where every sample is its own engine request. The offline `LLM` feeds the same series from each step's
stats and each finished output (`record_finished`, timed by the engine's own stamps: no inter-token latencies), and
`LLM.get_metrics()` reads them back as vLLM's reader does (`read_metrics`: Counter, Gauge, Vector, Histogram).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pagedllm.engine.llm_engine import EngineStats
from pagedllm.outputs import RequestOutput

PREFIX = "pagedllm:"
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_TPOT_BUCKETS = _ITL_BUCKETS  # vLLM gives its per-request TPOT histogram the same buckets as ITL
_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


def _token_buckets(max_model_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to the context length (vLLM's build_1_2_5_buckets)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return buckets
            buckets.append(float(value))
        exponent += 1


class ServerMetrics:
    def __init__(self, model_name: str, max_model_len: int, max_lora: int = 0) -> None:
        self.registry = r = CollectorRegistry()
        self._model_name = model_name
        labels = ["model_name"]

        # Every series carries model_name, as vLLM's do; bind it once.
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        self.preemptions = counter("num_preemptions", "Cumulative number of preemptions from the engine.")
        self.prefix_queries = counter("prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_hits = counter("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        # The KV tier beyond the GPU pool (kv_transfer/): host-memory offload and blocks received from other engines
        self.external_queries = counter("external_prefix_cache_queries",
                                        "External prefix cache queries from KV connector cross-instance cache sharing, "
                                        "in terms of number of queried tokens.")
        self.external_hits = counter("external_prefix_cache_hits",
                                     "External prefix cache hits from KV connector cross-instance cache sharing, in "
                                     "terms of number of cached tokens.")
        self.mm_queries = counter("mm_cache_queries", "Multi-modal cache queries, in terms of number of queried items.")
        self.mm_hits = counter("mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items.")
        self.success = Counter(PREFIX + "request_success", "Count of successfully processed requests.",
                               labels + ["finished_reason"], registry=r)
        for reason in ("stop", "length", "abort"):  # exported at 0 from the start, so rates work
            self.success.labels(model_name, reason)
        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.", _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", _ITL_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.", _TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", _LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", _LATENCY_BUCKETS)
        self.inference = histogram("request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.", _LATENCY_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", _LATENCY_BUCKETS)
        self.decode = histogram("request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", _LATENCY_BUCKETS)
        tokens = _token_buckets(max_model_len)
        self.request_prompt = histogram("request_prompt_tokens", "Number of prefill tokens processed.", tokens)
        self.request_generation = histogram("request_generation_tokens", "Number of generation tokens processed.", tokens)
        # Speculative decoding (zero unless it is on)
        self.spec_drafts = counter("spec_decode_num_drafts", "Number of spec decoding drafts.")
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Number of draft tokens.")
        self.spec_accepted = counter("spec_decode_num_accepted_tokens", "Number of accepted tokens.")
        self.spec_per_pos = Counter(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                    "Accepted tokens per draft position.", labels + ["position"], registry=r)
        self._spec_seen = (0, 0, 0, [])  # drafts, draft tokens, accepted, per position
        # vLLM's lora_requests_info: the adapters of running and waiting requests as labels, the time as value
        self.lora_info = Gauge(PREFIX + "lora_requests_info", "Running stats on lora requests.",
                               ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=r)
        self.max_lora = max_lora
        # Per-sample progress, keyed by (request_id, sample index): last token time, tokens so far.
        self._last_token: dict[tuple[str, int], float] = {}
        self._num_tokens: dict[tuple[str, int], int] = {}
        self._preemptions_seen = 0
        self._lookups_seen: dict[str, tuple[int, int]] = {}  # a cache's (queries, hits) totals so far

    def _add_lookups(self, cache: str, queries: Counter, hits: Counter, num_queries: int, num_hits: int) -> None:
        """A cache's queries / hits counters advanced to the engine's totals."""
        seen_queries, seen_hits = self._lookups_seen.get(cache, (0, 0))
        if num_queries > seen_queries:
            queries.inc(num_queries - seen_queries)
            hits.inc(num_hits - seen_hits)
            self._lookups_seen[cache] = (num_queries, num_hits)

    def record_step(self, stats: EngineStats, outputs: list[RequestOutput], now: float) -> None:
        """Engine-thread hook: one step's stats and DELTA outputs."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        if stats.num_preemptions > self._preemptions_seen:
            self.preemptions.inc(stats.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = stats.num_preemptions
        self._add_lookups("prefix", self.prefix_queries, self.prefix_hits, stats.prefix_cache_queries,
                          stats.prefix_cache_hits)
        self._add_lookups("external", self.external_queries, self.external_hits, stats.external_prefix_cache_queries,
                          stats.external_prefix_cache_hits)
        self._add_lookups("mm", self.mm_queries, self.mm_hits, stats.mm_cache_queries, stats.mm_cache_hits)
        if self.max_lora:
            self.lora_info.clear()
            self.lora_info.labels(str(self.max_lora), ",".join(stats.waiting_loras), ",".join(stats.running_loras)).set(now)
        spec = stats.spec_decode
        if spec is not None and spec.num_drafts > self._spec_seen[0]:
            drafts, tokens, accepted, per_pos = self._spec_seen
            self.spec_drafts.inc(spec.num_drafts - drafts)
            self.spec_draft_tokens.inc(spec.num_draft_tokens - tokens)
            self.spec_accepted.inc(spec.num_accepted_tokens - accepted)
            for pos, count in enumerate(spec.accepted_per_pos):  # every position exported, 0 included
                seen = per_pos[pos] if pos < len(per_pos) else 0
                self.spec_per_pos.labels(self._model_name, str(pos)).inc(count - seen)
            self._spec_seen = (spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens, list(spec.accepted_per_pos))
        for output in outputs:
            if isinstance(output, RequestOutput):  # pooling outputs carry no tokens to count
                self._record_output(output, now)

    def record_finished(self, output: RequestOutput, now: float) -> None:
        """Offline: a finished FINAL_ONLY output, its whole completion at once, its first token at the engine's
        stamp (TTFT and prefill as the server's; no inter-token latencies)."""
        metrics = output.metrics
        first = metrics.first_token_time if metrics is not None else None
        for completion in output.outputs:
            if completion.token_ids and first is not None:
                self._last_token[(output.request_id, completion.index)] = first
                self.prompt_tokens.inc(len(output.prompt_token_ids))
                self.ttft.observe(first - metrics.arrival_time)
                if metrics.first_scheduled_time is not None:
                    self.prefill.observe(first - metrics.first_scheduled_time)
                self._num_tokens[(output.request_id, completion.index)] = len(completion.token_ids)
                self.generation_tokens.inc(len(completion.token_ids))
        self._record_output(RequestOutput(output.request_id, output.prompt, output.prompt_token_ids, None,
                                          [dataclasses.replace(c, token_ids=[]) for c in output.outputs], True,
                                          metrics=metrics), now)

    def _record_output(self, output: RequestOutput, now: float) -> None:
        metrics = output.metrics
        arrival = metrics.arrival_time if metrics is not None else now
        num_prompt = len(output.prompt_token_ids)
        for completion in output.outputs:
            key = (output.request_id, completion.index)
            new = len(completion.token_ids)
            if new:
                last = self._last_token.get(key)
                if last is None:  # first token of this sample
                    self.prompt_tokens.inc(num_prompt)
                    self.ttft.observe(now - arrival)
                    if metrics is not None and metrics.first_scheduled_time is not None:
                        self.prefill.observe(now - metrics.first_scheduled_time)
                else:
                    self.itl.observe(now - last)
                self._last_token[key] = now
                self._num_tokens[key] = self._num_tokens.get(key, 0) + new
                self.generation_tokens.inc(new)
            if completion.finish_reason is None:
                continue
            first_token_seen = key in self._last_token
            self._last_token.pop(key, None)
            self.success.labels(self._model_name, completion.finish_reason).inc()
            self.e2e.observe(now - arrival)
            self.request_prompt.observe(num_prompt)
            num_generated = self._num_tokens.pop(key, 0)
            self.request_generation.observe(num_generated)
            if metrics is not None and metrics.first_scheduled_time is not None:
                self.queue.observe(max(0.0, metrics.first_scheduled_time - arrival))
                self.inference.observe(now - metrics.first_scheduled_time)
            if metrics is not None and metrics.first_token_time is not None and first_token_seen:
                self.decode.observe(max(0.0, now - metrics.first_token_time))
            # Engine-stamped token times, so bench serve can tell the engine's per-token time from what its
            # clients see. They are the first sample's (index 0), so other samples of an n > 1 request are left out.
            if (metrics is not None and completion.index == 0 and num_generated >= 2
                    and metrics.first_token_time is not None and metrics.last_token_time is not None):
                self.tpot.observe(max(0.0, metrics.last_token_time - metrics.first_token_time) / (num_generated - 1))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# vLLM's metric reader types (vllm.v1.metrics.reader), for LLM.get_metrics()


@dataclass
class Metric:
    name: str
    labels: dict[str, str]


@dataclass
class CounterMetric(Metric):
    value: int


@dataclass
class GaugeMetric(Metric):
    value: float


@dataclass
class VectorMetric(Metric):
    """A counter with a numeric label (spec decoding's per-position counts), as one list by that label."""

    values: list[int]


@dataclass
class HistogramMetric(Metric):
    count: int
    sum: float
    buckets: dict[str, int] = field(default_factory=dict)  # upper bound -> cumulative count


_VECTOR_LABELS = {PREFIX + "spec_decode_num_accepted_tokens_per_pos": "position"}


def read_metrics(registry: CollectorRegistry) -> list[Metric]:
    """Every series of the registry, as vLLM's `get_metrics_snapshot` gives them."""
    out: list[Metric] = []
    for family in registry.collect():
        key = _VECTOR_LABELS.get(family.name)
        if key is not None:
            samples = [s for s in family.samples if s.name.endswith("_total")]
            size = 1 + max((int(s.labels[key]) for s in samples), default=-1)
            values = [0] * size
            for s in samples:
                values[int(s.labels[key])] = int(s.value)
            out.append(VectorMetric(family.name, {"model_name": samples[0].labels["model_name"]} if samples else {}, values))
            continue
        groups: dict[tuple, dict] = {}
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k != "le"}
            groups.setdefault(tuple(sorted(labels.items())), {"labels": labels, "samples": []})["samples"].append(s)
        for group in groups.values():
            samples, labels = group["samples"], group["labels"]
            if family.type == "counter":
                value = next((s.value for s in samples if s.name.endswith("_total")), 0)
                out.append(CounterMetric(family.name, labels, int(value)))
            elif family.type == "gauge":
                out.append(GaugeMetric(family.name, labels, float(samples[0].value)))
            elif family.type == "histogram":
                buckets = {s.labels["le"]: int(s.value) for s in samples if s.name.endswith("_bucket")}
                count = next(int(s.value) for s in samples if s.name.endswith("_count"))
                total = next(float(s.value) for s in samples if s.name.endswith("_sum"))
                out.append(HistogramMetric(family.name, labels, count, total, buckets))
    return out
