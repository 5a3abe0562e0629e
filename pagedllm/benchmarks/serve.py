"""`pagedllm bench serve`: load-test any OpenAI-compatible server through streaming /v1/completions.

Prompts are random token ids (sent as token-id prompts, so their lengths are exact); arrivals follow a
Poisson process at --request-rate (inf: all at once), at most --max-concurrency in flight. EOS is ignored
when the server accepts `ignore_eos`, so each request generates --output-len tokens. Reports requests/s,
output tokens/s, and mean / median / p99 of TTFT, TPOT (per output token after the first) and ITL (between
streamed chunks), as vLLM's `benchmark_serving` does.

--request-rate 10,20,inf runs the same workload once per rate and adds a table of all of them (and --plot, the
latency curves). Where the server's /metrics has the per-request TPOT histogram (ours or vLLM's), the engine's
own mean TPOT over each run comes from its deltas, and the client's mean over it is the server's overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from pagedllm.benchmarks.plot import rate_label, write_plot
from pagedllm.benchmarks.workloads import BenchRequest, make_requests, special_token_ids, token_pool


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    priority: int = 0
    label: str = ""  # the request's class under --mix ("4096x64")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (the /v1 routes live under it)")
    parser.add_argument("--model", default=None, help="model name to request (default: the server's first in /v1/models)")
    parser.add_argument("--tokenizer", default=None,
                        help="local model dir or .gguf whose vocabulary the random prompts are drawn from (default: the bundled SmolLM2)")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--request-rate", type=parse_rates, default="inf", metavar="RATE[,RATE...]",
                        help="requests per second, Poisson arrivals (default inf: all at once); "
                             "a comma-separated list (10,20,inf) runs the workload once per rate")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once (default: unbounded)")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="tokens to generate per request")
    parser.add_argument("--mix", type=parse_mix, default=None, metavar="IN:OUT:WEIGHT[,...]",
                        help="requests of several shapes in random order, e.g. 4096:64:1,256:256:8 (long prompts "
                             "among chats); figures per shape too (overrides --input-len and --output-len)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--high-priority-fraction", type=float, default=0.0, metavar="F",
                        help="send this share of the requests (seeded) with priority -1, the rest with 0, and report "
                             "TTFT per class (a server with --scheduling-policy priority)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")
    parser.add_argument("--api-key", default=os.environ.get("PAGEDLLM_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before one request counts as failed")
    parser.add_argument("--disable-tqdm", action="store_true")
    parser.add_argument("--output-json", default=None, metavar="PATH",
                        help="write the figures and args here (a list of per-rate figures for several rates)")
    parser.add_argument("--plot", default=None, metavar="PATH",
                        help="write TTFT and TPOT (p50, p99) against request rate here, as HTML with inline SVG")


def parse_rates(text: str) -> list[float]:
    """`10,20,inf` -> [10.0, 20.0, inf]; every rate must be positive."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of request rates: {text!r}") from None
    if not rates or not all(rate > 0 for rate in rates):  # NaN fails `> 0` too
        raise argparse.ArgumentTypeError(f"request rates must be positive numbers or inf: {text!r}")
    return rates


# The per-request TPOT histogram (engine-stamped token times), ours first, then vLLM's.
_TPOT_HISTOGRAMS = ("pagedllm:request_time_per_output_token_seconds", "vllm:request_time_per_output_token_seconds")


def parse_mix(text: str) -> list[tuple[int, int, float]]:
    """"4096:64:1,256:256:8" -> [(4096, 64, 1.0), (256, 256, 8.0)]: input length, output length, weight."""
    parts = []
    for item in text.split(","):
        fields = item.strip().split(":")
        try:
            if len(fields) != 3:
                raise ValueError
            parts.append((int(fields[0]), int(fields[1]), float(fields[2])))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--mix takes IN:OUT:WEIGHT[,IN:OUT:WEIGHT...], got {item!r}") from None
        if min(parts[-1]) <= 0:
            raise argparse.ArgumentTypeError(f"--mix: lengths and weights must be positive, got {item!r}")
    return parts


def mixed_requests(num_prompts: int, mix: list[tuple[int, int, float]], pool: list[int],
                   seed: int = 0) -> tuple[list[BenchRequest], list[str]]:
    """num_prompts requests whose shapes are drawn from `mix` by weight, and each one's label ("IN x OUT")."""
    rng = random.Random(seed)
    labels = [f"{i}x{o}" for i, o, _ in mix]
    drawn = rng.choices(range(len(mix)), weights=[w for _, _, w in mix], k=num_prompts)
    by_shape = [iter(make_requests(drawn.count(k), i, o, pool, seed + 1 + k)) for k, (i, o, _) in enumerate(mix)]
    return [next(by_shape[k]) for k in drawn], [labels[k] for k in drawn]


def tpot_totals(text: str) -> tuple[float, float] | None:
    """(sum, count) of the server's per-request TPOT histogram in a /metrics page, over all its label sets."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}  # sample name -> its total over label sets (model, engine)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    for name in _TPOT_HISTOGRAMS:
        if name + "_sum" in values and name + "_count" in values:
            return values[name + "_sum"], values[name + "_count"]
    return None


def engine_tpot_ms(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    """The engine's mean TPOT (ms) over the requests that finished between two /metrics readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1]) * 1000


async def _read_tpot_totals(client: Any, base: str) -> tuple[float, float] | None:
    try:
        response = await client.get(base + "/metrics")
        return tpot_totals(response.text) if response.status_code == 200 else None
    except Exception:  # noqa: BLE001 - a server without (readable) metrics just gets no overhead figure
        return None


def _prompt_pool(tokenizer: str | None) -> list[int]:
    from transformers import AutoConfig

    from pagedllm.models.gguf import resolve_model

    path = resolve_model(tokenizer)
    config = AutoConfig.from_pretrained(path)
    return token_pool(config.vocab_size, special_token_ids(path, config))


async def _send(client: Any, url: str, payload: dict[str, Any], prompt_len: int) -> RequestResult:
    result = RequestResult(prompt_len=prompt_len)
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message"))
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last, chunks = now, chunks + 1
    except Exception as error:  # noqa: BLE001 - a failed request is counted, not fatal
        result.error = repr(error)
        return result
    result.latency = last - start
    result.output_tokens = result.output_tokens or chunks  # servers without usage: one token per chunk
    result.ok = chunks > 0
    return result


async def _probe(client: Any, url: str, payload: dict[str, Any]) -> dict[str, Any]:
    """One short request, which also warms the server up; drops `ignore_eos` if the server rejects it."""
    for candidate in (payload, {k: v for k, v in payload.items() if k != "ignore_eos"}):
        probe = {k: v for k, v in candidate.items() if k != "stream_options"}
        response = await client.post(url, json={**probe, "stream": False, "max_tokens": 1})
        if response.status_code == 200:
            return candidate
    raise RuntimeError(f"the server rejected the probe request: HTTP {response.status_code}: {response.text[:300]}")


async def _run(args: argparse.Namespace, requests: list[BenchRequest],
               labels: list[str] | None = None) -> tuple[list[RequestResult], float, bool, float | None]:
    """One rate's run (args.request_rate is one number here); also the engine's mean TPOT over it, if exported."""
    import httpx
    from tqdm.auto import tqdm

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.base_url.rstrip("/")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, timeout=args.timeout, limits=limits) as client:
        model = args.model
        if model is None:
            model = (await client.get(base + "/v1/models")).raise_for_status().json()["data"][0]["id"]
        url = base + "/v1/completions"
        common = {"model": model, "temperature": args.temperature, "ignore_eos": True, "stream": True,
                  "stream_options": {"include_usage": True}}
        common = await _probe(client, url, {**common, "prompt": requests[0].prompt_token_ids})
        common.pop("prompt")
        ignore_eos = "ignore_eos" in common

        limit = asyncio.Semaphore(args.max_concurrency or len(requests))
        bar = tqdm(total=len(requests), desc="requests", disable=args.disable_tqdm, dynamic_ncols=True)

        urgent = random.Random(args.seed + 1)

        async def one(request: BenchRequest, priority: int, label: str) -> RequestResult:
            async with limit:
                payload = {**common, "prompt": request.prompt_token_ids, "max_tokens": request.output_len}
                if priority:
                    payload["priority"] = priority
                result = await _send(client, url, payload, len(request.prompt_token_ids))
            result.priority, result.label = priority, label
            bar.update(1)
            return result

        rng = random.Random(args.seed)
        tasks = []
        before = await _read_tpot_totals(client, base)  # after the probe, whose one token adds no TPOT sample
        start = time.perf_counter()
        for i, request in enumerate(requests):
            priority = -1 if urgent.random() < args.high_priority_fraction else 0
            tasks.append(asyncio.create_task(one(request, priority, labels[i] if labels else "")))
            if args.request_rate != float("inf") and i + 1 < len(requests):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
        engine_tpot = engine_tpot_ms(before, await _read_tpot_totals(client, base))
    return list(results), duration, ignore_eos, engine_tpot


def summarize(results: list[RequestResult], duration: float, engine_tpot: float | None = None) -> dict[str, Any]:
    import numpy as np

    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_len for r in done)
    summary: dict[str, Any] = {
        "completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    summary.update({k: v for k, v in _latencies(done).items() if k != "count"})
    if engine_tpot is not None and engine_tpot > 0:
        summary["engine_mean_tpot_ms"] = engine_tpot
        if any(r.output_tokens > 1 for r in done):  # the same per-request mean, as the clients saw it
            summary["server_overhead"] = summary["mean_tpot_ms"] / engine_tpot
    classes = {"high_priority": [r for r in done if r.priority < 0], "low_priority": [r for r in done if r.priority >= 0]}
    if classes["high_priority"]:  # --high-priority-fraction: TTFT per class, and the p99 ratio
        for name, members in classes.items():
            ms = np.array([r.ttft for r in members] or [0.0]) * 1000
            summary[f"{name}_p50_ttft_ms"], summary[f"{name}_p99_ttft_ms"] = float(np.median(ms)), float(np.percentile(ms, 99))
        summary["high_over_low_p99_ttft"] = summary["high_priority_p99_ttft_ms"] / summary["low_priority_p99_ttft_ms"]
    shapes = dict.fromkeys(r.label for r in results if r.label)
    if shapes:  # --mix: the same figures per request shape
        summary["by_shape"] = {label: _latencies([r for r in done if r.label == label]) for label in shapes}
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        summary["errors"] = errors[:5]
    return summary


def _latencies(done: list[RequestResult]) -> dict[str, float]:
    """Mean, median and p99 of TTFT, TPOT (per output token after the first) and ITL, in ms; and the count."""
    import numpy as np

    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    figures: dict[str, float] = {"count": len(done)}
    for name, values in (("ttft", [r.ttft for r in done]), ("tpot", tpots), ("itl", [x for r in done for x in r.itl])):
        ms = np.array(values or [0.0]) * 1000
        figures.update({f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
                        f"p99_{name}_ms": float(np.percentile(ms, 99))})
    return figures


def _print(summary: dict[str, Any], args: argparse.Namespace, ignore_eos: bool) -> None:
    rows = [
        ("Successful requests", summary["completed"]), ("Failed requests", summary["failed"]),
        ("Maximum request concurrency", args.max_concurrency or "unbounded"), ("Request rate configured (RPS)", args.request_rate),
        ("ignore_eos accepted", "yes" if ignore_eos else "no"), ("Benchmark duration (s)", f"{summary['duration_s']:.2f}"),
        ("Total input tokens", summary["total_input_tokens"]), ("Total generated tokens", summary["total_output_tokens"]),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}"),
    ]
    print("{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="))
    for label, value in rows:
        print(f"{label + ':':<40}{str(value):>10}")
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"), ("itl", "Inter-token Latency")):
        print("{s:{c}^50}".format(s=f" {title} ", c="-"))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            print(f"{f'{label} {name.upper()} (ms):':<40}{summary[f'{stat}_{name}_ms']:>10.2f}")
    if "high_over_low_p99_ttft" in summary:
        print("{s:{c}^50}".format(s=" TTFT by priority ", c="-"))
        for name in ("high_priority", "low_priority"):
            print(f"{f'{name} P50 / P99 TTFT (ms):':<40}{summary[f'{name}_p50_ttft_ms']:>8.1f} / {summary[f'{name}_p99_ttft_ms']:.1f}")
        print(f"{'High / low P99 TTFT:':<40}{summary['high_over_low_p99_ttft']:>10.3f}")
    for label, shape in summary.get("by_shape", {}).items():
        print("{s:{c}^50}".format(s=f" {label} ({shape['count']} requests) ", c="-"))
        for name in ("ttft", "tpot"):
            text = f"{shape[f'median_{name}_ms']:.1f} / {shape[f'p99_{name}_ms']:.1f}"
            print(f"{f'P50 / P99 {name.upper()} (ms):':<40}{text:>10}")
    print("{s:{c}^50}".format(s=" Server (from /metrics) ", c="-"))
    engine, overhead = summary.get("engine_mean_tpot_ms"), summary.get("server_overhead")
    print(f"{'Engine TPOT, mean (ms):':<40}{'n/a' if engine is None else f'{engine:.2f}':>10}")
    label = "Server overhead (client TPOT mean / engine TPOT mean):"
    print(f"{label} {'n/a' if overhead is None else f'{overhead:.2f}x'}")
    print("=" * 50)
    for error in summary.get("errors", []):
        print(f"error: {error}")


def format_table(runs: list[dict[str, Any]]) -> str:
    """One row per rate: throughput, TTFT / TPOT / ITL p50 and p99 (ms), failed requests."""
    head = f"{'rate':>7} {'req/s':>8} {'out tok/s':>10}"
    for name in ("TTFT", "TPOT", "ITL"):
        head += f" {name + ' p50':>9} {name + ' p99':>9}"
    lines = ["Per request rate (TTFT, TPOT, ITL in ms):", head + f" {'failed':>7}"]
    for run in runs:
        line = f"{rate_label(run['request_rate']):>7} {run['request_throughput']:>8.2f}"
        line += f" {run['output_throughput']:>10.1f}"
        for name in ("ttft", "tpot", "itl"):
            line += f" {run[f'median_{name}_ms']:>9.2f} {run[f'p99_{name}_ms']:>9.2f}"
        lines.append(line + f" {run['failed']:>7}")
    return "\n".join(lines)


def serve_requests(args: argparse.Namespace, pool: list[int]) -> tuple[list[BenchRequest], list[str] | None]:
    """The run's requests (and their shape labels under --mix)."""
    if args.mix:
        return mixed_requests(args.num_prompts, args.mix, pool, args.seed)
    return make_requests(args.num_prompts, args.input_len, args.output_len, pool, args.seed), None


def main(args: argparse.Namespace) -> dict[str, Any] | list[dict[str, Any]]:
    """One summary for one rate (the shape --output-json has always had); a list of them for several."""
    rates: list[float] = args.request_rate
    requests, labels = serve_requests(args, _prompt_pool(args.tokenizer))
    runs, ignore_eos = [], True
    for rate in rates:
        run_args = argparse.Namespace(**{**vars(args), "request_rate": rate})
        results, duration, accepted, engine_tpot = asyncio.run(_run(run_args, requests, labels))
        summary = summarize(results, duration, engine_tpot)
        _print(summary, run_args, accepted)
        runs.append({"request_rate": rate, **summary})
        ignore_eos = ignore_eos and accepted
    if len(runs) > 1:
        print(format_table(runs))
    if args.plot:
        title = f"pagedllm bench serve: {args.base_url}, {args.input_len} in / {args.output_len} out"
        write_plot(args.plot, runs, title)
        print(f"plot: {args.plot}")
    if args.output_json:
        from pagedllm.benchmarks import write_json

        if len(runs) == 1:  # as before: the figures without the rate, which args holds as one number
            single = argparse.Namespace(**{**vars(args), "request_rate": rates[0]})
            write_json(args.output_json, single, {"benchmark": "serve", "ignore_eos": ignore_eos, "results": summary})
        else:
            write_json(args.output_json, args, {"benchmark": "serve", "ignore_eos": ignore_eos, "results": runs})
    return summary if len(runs) == 1 else runs
