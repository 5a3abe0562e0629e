"""`pagedllm bench disagg`: disaggregated prefill against one engine, under the same mixed load, in one run.

Colocated: one `pagedllm serve` with the whole device (--gpu-memory-utilization). Disaggregated: a producer and a
consumer (`--kv-transfer-config`, --connector) that split the device (--split-memory-utilization each; the producer
starts first, so the consumer's share is measured beside it), behind `pagedllm proxy`. The same requests (`bench
serve --mix`; by default 4096-token prompts with 64 out among 256 / 256 chats, one in nine) arrive at --request-rate
(Poisson) against each setup. Reported: each setup's throughput and TTFT / TPOT per request shape, and the ratios
disaggregated / colocated of the chats' TPOT p99 (the shape with the longest output) and of total tokens/s.

`--model` takes a bundled shape (random weights; give --tokenizer for its vocabulary) or a checkpoint; anything in
--server-args goes to every `pagedllm serve` as it is (e.g. "--kv-cache-memory 268435456" on the CPU)."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
from typing import Any

import httpx

from pagedllm.benchmarks import write_json
from pagedllm.benchmarks import serve as bench_serve
from pagedllm.benchmarks.server_process import ServerProcess, free_port
from pagedllm.benchmarks.workloads import SHAPES, shape_dir

SETUPS = ("colocated", "disaggregated")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a checkpoint or a bundled shape (default: the bundled SmolLM2)")
    parser.add_argument("--tokenizer", default=None, help="the servers' tokenizer (a shape has none of its own)")
    parser.add_argument("--mix", type=bench_serve.parse_mix, default="4096:64:1,256:256:8",
                        metavar="IN:OUT:WEIGHT[,...]",
                        help="request shapes and their weights (default 4096:64:1,256:256:8)")
    parser.add_argument("--num-prompts", type=int, default=400)
    parser.add_argument("--request-rate", type=float, default=4.0, help="Poisson arrivals per second (default 4)")
    parser.add_argument("--setups", default=",".join(SETUPS), help="which to run, in order (default: both)")
    parser.add_argument("--connector", default="IpcConnector", choices=["IpcConnector", "TcpConnector"])
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="the colocated engine's share")
    parser.add_argument("--split-memory-utilization", type=float, default=0.45, help="each disaggregated engine's")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--server-args", default="", help="more `pagedllm serve` flags for every engine, one string")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before one request counts as failed")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds an engine may take to start")
    parser.add_argument("--disable-tqdm", action="store_true")
    parser.add_argument("--output-json", default=None, metavar="PATH")


def _engine_args(args: argparse.Namespace, utilization: float) -> list[str]:
    model = args.model
    extra = shlex.split(args.server_args)
    if model in SHAPES:
        model, extra = shape_dir(model), ["--load-format", "dummy", *extra]
    if model is None:
        from pagedllm.models.gguf import resolve_model

        model = resolve_model(None)
    tokenizer = ["--tokenizer", args.tokenizer] if args.tokenizer else []
    return [model, *tokenizer, "--max-model-len", str(args.max_model_len), "--gpu-memory-utilization",
            str(utilization), *extra]


def _start(args: argparse.Namespace, setup: str) -> list[ServerProcess]:
    """The setup's processes, the one clients talk to last."""
    if setup == "colocated":
        return [ServerProcess(_engine_args(args, args.gpu_memory_utilization), start_timeout=args.start_timeout)]
    engine = _engine_args(args, args.split_memory_utilization)
    servers: list[ServerProcess] = []
    try:
        for role in ("kv_producer", "kv_consumer"):
            config = {"kv_connector": args.connector, "kv_role": role, "kv_port": free_port()}
            servers.append(ServerProcess([*engine, "--kv-transfer-config", json.dumps(config)],
                                         start_timeout=args.start_timeout))
        servers.append(ServerProcess(["--prefill", servers[0].base_url, "--decode", servers[1].base_url],
                                     command="proxy", start_timeout=60))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def _load(args: argparse.Namespace, base_url: str, requests: list[Any], labels: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    bench_serve.add_arguments(parser)
    run_args = parser.parse_args([])
    for name in ("request_rate", "temperature", "seed", "timeout", "disable_tqdm"):
        setattr(run_args, name, getattr(args, name))
    run_args.base_url = base_url
    results, duration, _, engine_tpot = asyncio.run(bench_serve._run(run_args, requests, labels))
    return bench_serve.summarize(results, duration, engine_tpot)


def _counter(metrics_url: str, name: str) -> float:
    """A `pagedllm:` counter's total from a server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(metrics_url, timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == f"pagedllm:{name}_total")


def main(args: argparse.Namespace) -> dict[str, Any]:
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    if not setups or set(setups) - set(SETUPS):
        raise ValueError(f"--setups takes {' and/or '.join(SETUPS)}, got {args.setups!r}.")
    model_path = _engine_args(args, 0.0)[0]
    requests, labels = bench_serve.mixed_requests(args.num_prompts, args.mix, bench_serve._prompt_pool(model_path),
                                                  args.seed)
    chat = max(args.mix, key=lambda shape: shape[1])
    chat_label = f"{chat[0]}x{chat[1]}"
    results: dict[str, Any] = {}
    for setup in setups:
        servers = _start(args, setup)
        try:
            results[setup] = summary = _load(args, servers[-1].base_url, requests, labels)
            if setup == "disaggregated":  # the consumer's prompt tokens that came from the producer, not computed
                summary["pulled_tokens"] = _counter(servers[1].url("/metrics"), "external_prefix_cache_hits")
        finally:
            for server in reversed(servers):
                server.stop()
        shape = summary["by_shape"].get(chat_label, {})
        print(f"[{setup:>13}] {summary['completed']} of {len(requests)} requests in {summary['duration_s']:.1f} s: "
              f"{summary['total_token_throughput']:.0f} total tok/s; {chat_label} TPOT p50 / p99 "
              f"{shape.get('median_tpot_ms', 0):.1f} / {shape.get('p99_tpot_ms', 0):.1f} ms, TTFT p99 "
              f"{shape.get('p99_ttft_ms', 0):.0f} ms" + (f"; errors: {summary['errors']}" if summary["failed"] else "")
              + (f"; {summary['pulled_tokens']:.0f} prompt tokens pulled" if "pulled_tokens" in summary else ""))
    if len(results) == 2:
        split, one = results["disaggregated"], results["colocated"]
        results["ratios"] = ratios = {
            "chat_tpot_p99": split["by_shape"][chat_label]["p99_tpot_ms"] / one["by_shape"][chat_label]["p99_tpot_ms"],
            "total_token_throughput": split["total_token_throughput"] / one["total_token_throughput"],
        }
        print(f"disaggregated / colocated: {chat_label} TPOT p99 {ratios['chat_tpot_p99']:.2f}x, total tokens/s "
              f"{ratios['total_token_throughput']:.2f}x")
    payload = {"benchmark": "disagg", "chat_shape": chat_label, "results": results}
    if args.output_json:
        write_json(args.output_json, args, payload)
    return payload
