"""`pagedllm bench`: the CLI end to end on tiny models (both backends), the named workloads, the bundled shapes,
and `bench serve` against a stand-in server (threads in this process, no model)."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch

from pagedllm.benchmarks.workloads import SHAPES, WORKLOADS, apply_workload, make_requests, shape_dir, token_pool
from pagedllm.entrypoints.cli import main as cli_main
from tests.reference.models import TINY_CONFIGS, make_tiny_model

KV = str(4 << 20)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_model("llama", str(tmp_path_factory.mktemp("bench") / "llama"))


@pytest.fixture(scope="module")
def config_only_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny qwen3 shape as config.json alone, like the bundled configs."""
    path = tmp_path_factory.mktemp("shape")
    spec = dict(TINY_CONFIGS["qwen3"], bos_token_id=1, eos_token_id=2)
    (path / "config.json").write_text(json.dumps(spec))
    return str(path)


def run_cli(argv: list[str], tmp_path: os.PathLike) -> dict:
    out = os.path.join(tmp_path, "result.json")
    cli_main(["bench", *argv, "--output-json", out])
    with open(out) as f:
        return json.load(f)


def check_environment(result: dict) -> None:
    env = result["environment"]
    assert env["device"] == "cpu" and env["dtype"] == "float32"
    assert env["torch"] == torch.__version__ and env["transformers"]


def test_throughput_both(tiny_llama: str, tmp_path: os.PathLike) -> None:
    result = run_cli(["throughput", "--model", tiny_llama, "--input-len", "8", "--output-len", "4", "--num-prompts", "3",
                      "--backend", "both", "--hf-batch-size", "2", "--kv-cache-memory", KV], tmp_path)
    assert result["benchmark"] == "throughput"
    check_environment(result)
    for backend in ("pagedllm", "hf"):
        figures = result["results"][backend]
        assert figures["num_requests"] == 3 and figures["prompt_tokens"] == 24 and figures["output_tokens"] == 12
        assert figures["elapsed_s"] > 0
        assert figures["output_tokens_per_s"] == pytest.approx(12 / figures["elapsed_s"])
        assert figures["total_tokens_per_s"] == pytest.approx(36 / figures["elapsed_s"])
        assert figures["requests_per_s"] == pytest.approx(3 / figures["elapsed_s"])
    ours, hf = result["results"]["pagedllm"], result["results"]["hf"]
    assert result["ratio_pagedllm_over_hf"] == pytest.approx(ours["output_tokens_per_s"] / hf["output_tokens_per_s"])
    assert result["args"]["num_prompts"] == 3 and result["args"]["backend"] == "both"


def test_throughput_data_parallel(tiny_llama: str, tmp_path: os.PathLike) -> None:
    """--data-parallel-size 2: the workload through two engine replicas (processes), every token counted once."""
    result = run_cli(["throughput", "--model", tiny_llama, "--input-len", "8", "--output-len", "4", "--num-prompts", "6",
                      "--data-parallel-size", "2", "--kv-cache-memory", KV], tmp_path)
    figures = result["results"]["pagedllm"]
    assert figures["num_requests"] == 6 and figures["output_tokens"] == 24 and figures["elapsed_s"] > 0


def test_latency_both(tiny_llama: str, tmp_path: os.PathLike) -> None:
    result = run_cli(["latency", "--model", tiny_llama, "--input-len", "8", "--output-len", "4", "--batch-size", "2",
                      "--num-iters", "2", "--num-iters-warmup", "0", "--temperature", "0", "--backend", "both",
                      "--kv-cache-memory", KV], tmp_path)
    assert result["benchmark"] == "latency"
    check_environment(result)
    for backend in ("pagedllm", "hf"):
        figures = result["results"][backend]
        assert len(figures["latencies_s"]) == 2
        assert figures["min_latency_s"] <= figures["median_latency_s"] <= figures["max_latency_s"]
        assert figures["output_tokens_per_s"] == pytest.approx(8 / figures["median_latency_s"])
    assert "ratio_pagedllm_over_hf" in result


def test_config_only_dir_dummy(config_only_dir: str, tmp_path: os.PathLike) -> None:
    """A directory with config.json alone runs with random weights, in both backends, without a tokenizer."""
    from pagedllm import LLM, SamplingParams

    llm = LLM(config_only_dir, load_format="dummy", skip_tokenizer_init=True, kv_cache_memory=int(KV))
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    result = run_cli(["throughput", "--model", config_only_dir, "--load-format", "dummy", "--input-len", "5",
                      "--output-len", "3", "--num-prompts", "2", "--backend", "both", "--kv-cache-memory", KV], tmp_path)
    assert result["environment"]["load_format"] == "dummy" and not result["environment"]["detokenize"]
    assert result["results"]["hf"]["output_tokens"] == result["results"]["pagedllm"]["output_tokens"] == 6


def test_hf_static_batch_mixed_lengths(tiny_llama: str) -> None:
    from transformers import AutoConfig

    from pagedllm.benchmarks.hf_baseline import generate_batch, load_hf_model
    from pagedllm.benchmarks.workloads import BenchRequest

    model = load_hf_model(tiny_llama, AutoConfig.from_pretrained(tiny_llama), "auto", torch.float32, "cpu")
    out = generate_batch(model, [BenchRequest([5, 6, 7], 2), BenchRequest([8, 9, 10, 11, 12], 4)], 0.0, 0)
    assert out.shape == (2, 4)  # the batch runs to its longest request


def test_w2_lengths_deterministic_and_in_range() -> None:
    w2 = WORKLOADS["W2"]
    pool = token_pool(151936, {151643, 151645})
    assert pool[-1] == 151642 and len(pool) == 151643  # Qwen's special block at the top is left out
    first, second = (make_requests(w2.num_prompts, w2.input_len, w2.output_len, pool, seed=0) for _ in range(2))
    assert [r.prompt_token_ids for r in first] == [r.prompt_token_ids for r in second]
    inputs = [len(r.prompt_token_ids) for r in first]
    outputs = [r.output_len for r in first]
    assert len(first) == 256
    assert all(100 <= n <= 1024 for n in inputs + outputs)
    rng = random.Random(0)  # the documented order: all input lengths, then all output lengths
    assert inputs == [rng.randint(100, 1024) for _ in range(256)]
    assert outputs == [rng.randint(100, 1024) for _ in range(256)]
    assert len(set(outputs)) > 100  # varied, so per-request max_tokens are exercised


def test_p1_shares_its_prefix() -> None:
    p1 = WORKLOADS["P1"]
    requests = make_requests(4, p1.input_len, p1.output_len, list(range(10, 1000)), prefix_len=p1.prefix_len)
    assert all(len(r.prompt_token_ids) == 1024 + 64 and r.output_len == 64 for r in requests)
    assert len({tuple(r.prompt_token_ids[:1024]) for r in requests}) == 1
    assert len({tuple(r.prompt_token_ids[1024:]) for r in requests}) == 4


def parse(argv: list[str]) -> argparse.Namespace:
    from pagedllm.benchmarks.cli import add_bench_parser

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def test_workload_defaults_and_overrides() -> None:
    args = parse(["throughput", "--workload", "W1", "--num-prompts", "5"])
    apply_workload(args, "throughput")
    assert args.model == shape_dir("llama3-8b") and args.load_format == "dummy"
    assert (args.num_prompts, args.input_len, args.output_len, args.temperature) == (5, 512, 128, 1.0)
    args = parse(["latency", "--workload", "L1", "--model", "qwen3-0.6b", "--load-format", "auto"])
    apply_workload(args, "latency")
    assert args.model == shape_dir("qwen3-0.6b") and args.load_format == "auto"
    assert (args.batch_size, args.input_len, args.output_len, args.temperature) == (1, 128, 256, 0.0)
    args = parse(["throughput"])
    apply_workload(args, "throughput")
    assert args.model is None and args.load_format == "auto" and args.num_prompts == 64
    with pytest.raises(ValueError, match="latency workload"):
        args = parse(["throughput"])
        args.workload = "L1"
        apply_workload(args, "throughput")


@pytest.mark.parametrize(
    "shape, params, vocab, layers",
    [("llama3-8b", 8.03e9, 128256, 32), ("qwen3-0.6b", 0.596e9, 151936, 28), ("llama3-70b", 70.55e9, 128256, 80),
     ("llama3.1-405b", 405.85e9, 128256, 126)],
)
def test_bundled_shapes(shape: str, params: float, vocab: int, layers: int) -> None:
    """The shapes are config.json alone and build our model class; on the meta device, so no memory is used."""
    from transformers import AutoConfig

    from pagedllm.models.registry import get_model_class

    assert shape in SHAPES and os.listdir(shape_dir(shape)) == ["config.json"]
    config = AutoConfig.from_pretrained(shape_dir(shape))
    assert (config.vocab_size, config.num_hidden_layers, config.num_key_value_heads) == (vocab, layers, 8)
    with torch.device("meta"):
        model = get_model_class(config)(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=2e-3)


# ---- bench serve ----------------------------------------------------------------------------------------

ENGINE_TPOT_S = 0.001  # what the stand-in's engine reports per token; its stream is slower (CHUNK_GAP_S)
CHUNK_GAP_S = 0.003


class FakeServer(ThreadingHTTPServer):
    """Streams `max_tokens` one-token chunks per /v1/completions request and, with `metrics`, exports our own
    ServerMetrics, fed a finished output whose engine timestamps give ENGINE_TPOT_S per token."""

    def __init__(self, metrics: bool) -> None:
        from pagedllm.metrics import ServerMetrics

        super().__init__(("127.0.0.1", 0), _FakeHandler)
        self.metrics = ServerMetrics("fake", 256) if metrics else None
        self.lock = threading.Lock()
        self.num_requests = 0
        self.finish(2, 0.5)  # traffic from before the benchmark: its deltas must leave this out

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def finish(self, num_tokens: int, tpot: float) -> None:
        from pagedllm.engine.llm_engine import EngineStats
        from pagedllm.outputs import CompletionOutput, RequestMetrics, RequestOutput

        if self.metrics is None:
            return
        with self.lock:
            self.num_requests += 1
            stamps = RequestMetrics(0.0, first_token_time=1.0, last_token_time=1.0 + tpot * (num_tokens - 1))
            done = CompletionOutput(0, "", [7] * num_tokens, None, None, "length")
            out = RequestOutput(f"r{self.num_requests}", None, [1], None, [done], finished=True, metrics=stamps)
            self.metrics.record_step(EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, 0), [out], time.time())


class _FakeHandler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, body: bytes, content_type: str, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._reply(json.dumps({"data": [{"id": "fake"}]}).encode(), "application/json")
        elif self.path == "/metrics" and self.server.metrics is not None:
            self._reply(*self.server.metrics.render())
        else:
            self._reply(b"not found", "text/plain", 404)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = body["max_tokens"]
        if not body.get("stream"):
            self.server.finish(n, ENGINE_TPOT_S)
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}
            answer = {"choices": [{"index": 0, "text": "x" * n}], "usage": usage}
            self._reply(json.dumps(answer).encode(), "application/json")
            return
        self.send_response(200)  # HTTP/1.0: the stream ends when the connection closes
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for _ in range(n):
            time.sleep(CHUNK_GAP_S)
            self.wfile.write(b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n')
            self.wfile.flush()
        self.server.finish(n, ENGINE_TPOT_S)  # recorded before the client sees the end, as a real server does
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())


@pytest.fixture(params=[True, False], ids=["metrics", "no-metrics"])
def fake_server(request: pytest.FixtureRequest) -> Iterator[FakeServer]:
    server = FakeServer(metrics=request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def serve_cli(server: FakeServer, tokenizer: str, tmp_path: os.PathLike, *extra: str) -> dict:
    return run_cli(["serve", "--base-url", server.url, "--tokenizer", tokenizer, "--num-prompts", "3",
                    "--input-len", "4", "--output-len", "4", "--disable-tqdm", *extra], tmp_path)


def check_overhead(figures: dict, server: FakeServer) -> None:
    if server.metrics is None:
        assert "engine_mean_tpot_ms" not in figures and "server_overhead" not in figures
        return
    assert figures["engine_mean_tpot_ms"] == pytest.approx(ENGINE_TPOT_S * 1000)
    assert figures["server_overhead"] == pytest.approx(figures["mean_tpot_ms"] / figures["engine_mean_tpot_ms"])
    assert figures["server_overhead"] > 1  # the stream's chunks come CHUNK_GAP_S apart


def test_serve_single_rate(fake_server: FakeServer, config_only_dir: str, tmp_path: os.PathLike,
                           capsys: pytest.CaptureFixture[str]) -> None:
    plot = os.path.join(tmp_path, "curve.html")
    result = serve_cli(fake_server, config_only_dir, tmp_path, "--plot", plot)
    figures = result["results"]  # one rate: the figures as they have always been, the rate in args
    assert isinstance(figures, dict) and "request_rate" not in figures
    assert figures["completed"] == 3 and figures["failed"] == 0 and figures["total_output_tokens"] == 12
    assert result["ignore_eos"] and math.isinf(result["args"]["request_rate"])
    check_overhead(figures, fake_server)
    out = capsys.readouterr().out
    engine_line = next(line for line in out.splitlines() if line.startswith("Engine TPOT, mean (ms):"))
    overhead_line = next(line for line in out.splitlines() if line.startswith("Server overhead (client TPOT mean"))
    if fake_server.metrics is None:
        assert engine_line.endswith("n/a") and overhead_line.endswith("n/a")
    else:
        assert engine_line.endswith("1.00") and overhead_line.endswith(f"{figures['server_overhead']:.2f}x")
    assert "TTFT p50" not in out  # no table for one rate
    with open(plot) as f:
        page = f.read()
    assert page.count("<svg") == 2 and ">inf</text>" in page


def test_serve_rate_list(fake_server: FakeServer, config_only_dir: str, tmp_path: os.PathLike,
                         capsys: pytest.CaptureFixture[str]) -> None:
    plot = os.path.join(tmp_path, "curve.html")
    result = serve_cli(fake_server, config_only_dir, tmp_path, "--request-rate", "40,200,inf", "--plot", plot)
    runs = result["results"]
    assert [run["request_rate"] for run in runs] == [40.0, 200.0, math.inf]
    assert result["args"]["request_rate"] == [40.0, 200.0, math.inf]
    for run in runs:
        assert run["completed"] == 3 and run["total_output_tokens"] == 12
        check_overhead(run, fake_server)
    out = capsys.readouterr().out
    assert out.count(" Serving Benchmark Result ") == 3
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if "TTFT p50" in line)
    assert lines[head].split() == ["rate", "req/s", "out", "tok/s", "TTFT", "p50", "TTFT", "p99", "TPOT", "p50", "TPOT",
                                   "p99", "ITL", "p50", "ITL", "p99", "failed"]
    rows = [line.split() for line in lines[head + 1:head + 4]]
    assert [row[0] for row in rows] == ["40", "200", "inf"] and all(len(row) == 10 and row[-1] == "0" for row in rows)
    assert float(rows[0][5]) == pytest.approx(runs[0]["median_tpot_ms"], abs=0.01)
    with open(plot) as f:
        page = f.read()
    assert page.count("<svg") == 2 and all(f">{label}</text>" in page for label in ("inf", "TTFT p99", "TPOT p50"))


def test_serve_rate_parsing() -> None:
    from pagedllm.benchmarks.serve import parse_rates

    assert parse(["serve"]).request_rate == [math.inf]
    assert parse(["serve", "--request-rate", "4"]).request_rate == [4.0]
    assert parse(["serve", "--request-rate", "10, 20,30,40,inf"]).request_rate == [10.0, 20.0, 30.0, 40.0, math.inf]
    for bad in ("", "0", "-1,2", "nan", "10,fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_rates(bad)


def test_engine_tpot_from_metrics_deltas() -> None:
    """Totals over every label set (vLLM's one per engine too), ours preferred, vLLM's names as well."""
    from pagedllm.benchmarks.serve import engine_tpot_ms, tpot_totals

    def page(prefix: str, sums: list[float], counts: list[int]) -> str:
        name = f"{prefix}request_time_per_output_token_seconds"
        lines = [f"# HELP {name} Histogram of time_per_output_token_seconds per request.", f"# TYPE {name} histogram"]
        for engine, (total, count) in enumerate(zip(sums, counts)):
            labels = f'engine="{engine}",model_name="m"'
            lines += [f'{name}_bucket{{{labels},le="+Inf"}} {count}', f"{name}_count{{{labels}}} {count}",
                      f"{name}_sum{{{labels}}} {total}"]
        return "\n".join(lines) + "\n"

    before = tpot_totals(page("vllm:", [0.5, 0.25], [10, 5]))
    after = tpot_totals(page("vllm:", [0.75, 0.5], [20, 15]))
    assert before == (0.75, 15) and after == (1.25, 35)
    assert engine_tpot_ms(before, after) == pytest.approx(0.5 / 20 * 1000)
    assert tpot_totals(page("pagedllm:", [1.0], [4]) + page("vllm:", [9.0], [9])) == (1.0, 4)
    assert tpot_totals("# TYPE other_total counter\nother_total 3\n") is None
    assert engine_tpot_ms(None, after) is None and engine_tpot_ms(after, after) is None  # nothing finished between


def test_plot_rates_and_inf() -> None:
    from pagedllm.benchmarks.plot import nice_ticks, render_html

    assert nice_ticks(40) == [0, 10, 20, 30, 40] and nice_ticks(7.3) == [0, 2, 4, 6, 8] and nice_ticks(0) == [0, 1]

    def run(rate: float, p50: float, p99: float) -> dict[str, float]:
        return {"request_rate": rate, "median_ttft_ms": p50, "p99_ttft_ms": p99,
                "median_tpot_ms": p50, "p99_tpot_ms": p99}

    runs = [run(10.0, 3.0, 4.0), run(40.0, 5.0, 9.0), run(math.inf, 50.0, 100.0)]
    page = render_html(runs)
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 2 and page.count("<polyline") == 4
    ticks = [">0</text>", ">10</text>", ">40</text>", ">inf</text>", ">request rate (req/s)</text>"]
    assert all(tick in page for tick in ticks)
    assert "p99 at inf req/s: 100.00 ms" in page and "request rates (req/s): 10, 40, inf" in page
    only_inf = render_html([dict(runs[2])])
    assert only_inf.count("<circle") == 4 and ">inf</text>" in only_inf


def test_latency_copy_workload_with_speculation(smollm2: str, tmp_path: os.PathLike) -> None:
    """S1 (SmolLM2 repeats a passage) with --speculative-config: speculation off, then on, the ratio and the
    acceptance counters, in one run."""
    result = run_cli(["latency", "--workload", "S1", "--output-len", "24", "--num-iters", "1", "--num-iters-warmup", "0",
                      "--max-model-len", "1024", "--speculative-config",
                      '{"method": "ngram", "num_speculative_tokens": 3}'], tmp_path)
    figures = result["results"]
    assert set(figures) == {"pagedllm-no-spec", "pagedllm"} and figures["pagedllm"]["speedup_over_no_spec"] > 0
    spec = result["environment"]["spec_decode"]
    assert spec["num_drafts"] > 0 and len(spec["accepted_per_pos"]) == 3


def test_throughput_and_latency_with_loras(tiny_llama: str, tmp_path: os.PathLike) -> None:
    """--num-loras: random adapters written for the model's shape, the base run first, the ratio reported."""
    common = ["--model", tiny_llama, "--input-len", "8", "--output-len", "4", "--kv-cache-memory", KV,
              "--num-loras", "2", "--lora-rank", "4"]
    result = run_cli(["throughput", "--num-prompts", "6", *common], tmp_path)
    assert set(result["results"]) == {"pagedllm-no-lora", "pagedllm"} and result["results"]["pagedllm"]["ratio_over_no_lora"] > 0
    result = run_cli(["latency", "--num-iters", "1", "--num-iters-warmup", "0", *common], tmp_path)
    assert result["results"]["pagedllm"]["ratio_over_no_lora"] > 0


def test_mm_bench_on_a_tiny_vision_model(tmp_path: os.PathLike) -> None:
    """`bench mm`: requests with one image each through a tiny Qwen2.5-VL; the encoder's time per image is reported,
    and the qwen2.5-vl-7b shape's directory (config, tokenizer, image processor) loads as a config."""
    pytest.importorskip("PIL")
    from transformers import AutoConfig, AutoImageProcessor

    from pagedllm.benchmarks.multimodal import build_requests, write_shape
    from tests.reference.qwen2_vl import make_tiny_qwen2_vl

    model = make_tiny_qwen2_vl(os.path.join(tmp_path, "vl"), "qwen2_5_vl")
    result = run_cli(["mm", "--model", model, "--dtype", "float32", "--num-prompts", "10", "--image-size", "56",
                      "--input-len", "8", "--output-len", "4"], tmp_path)
    figures = result["results"]["pagedllm"]
    assert figures["requests"] == 6 and figures["image_tokens"] == 4  # 56 x 56: a 4 x 4 patch grid, 2 x 2 merged
    assert 0 < figures["encoder_s_per_image"] and 0 < figures["encoder_share_of_run"]
    assert 1 <= figures["encoding_steps"] <= figures["steps"] and 0 < figures["encoder_share_of_encoding_step"] < 1
    shape = write_shape("qwen2.5-vl-7b", os.path.join(tmp_path, "shape"))
    assert AutoConfig.from_pretrained(shape).text_config.hidden_size == 3584
    assert AutoImageProcessor.from_pretrained(shape).patch_size == 14
    ids, image = build_requests(shape, 2, 448, 64)[1]
    assert len(ids) == 67 and image.size == (448, 448)


def test_throughput_compare_offload(tiny_llama: str, tmp_path: os.PathLike) -> None:
    """--compare-offload: after a GPU prefix-cache reset the prompts' prefixes come back from the host tier (sized for
    every prompt by default) in one run and are computed again in the other."""
    result = run_cli(["throughput", "--model", tiny_llama, "--input-len", "8", "--output-len", "4", "--num-prompts", "6",
                      "--prefix-len", "64", "--num-prefixes", "3", "--kv-cache-memory", KV, "--compare-offload"], tmp_path)
    tier, recompute = result["results"]["pagedllm-kv-offload"], result["results"]["pagedllm-recompute"]
    assert tier["kv_offload_bytes"] > 0 and recompute["kv_offload_bytes"] == 0
    assert tier["host_tier_hit_tokens"] >= 3 * 64 and recompute["host_tier_hit_tokens"] == 0
    assert tier["cached_prompt_tokens"] >= 6 * 64 > recompute["cached_prompt_tokens"]
    assert result["results"]["kv_offload_speedup"]["tier_over_recompute_requests_per_s"] > 0


def test_requests_over_several_prefixes() -> None:
    requests = make_requests(6, 4, 2, list(range(10, 1000)), prefix_len=16, num_prefixes=3)
    assert [r.prompt_token_ids[:16] for r in requests[:3]] == [r.prompt_token_ids[:16] for r in requests[3:]]
    assert len({tuple(r.prompt_token_ids[:16]) for r in requests}) == 3


def test_serve_mix_parsing_and_requests() -> None:
    from pagedllm.benchmarks.serve import mixed_requests, parse_mix

    mix = parse_mix("64:4:1, 8:16:3")
    assert mix == [(64, 4, 1.0), (8, 16, 3.0)]
    for bad in ("64:4", "64:x:1", "0:4:1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_mix(bad)
    requests, labels = mixed_requests(200, mix, list(range(10, 1000)), seed=3)
    assert set(labels) == {"64x4", "8x16"} and 100 < labels.count("8x16") < 190
    assert all((len(r.prompt_token_ids), r.output_len) == ((64, 4) if label == "64x4" else (8, 16))
               for r, label in zip(requests, labels))
    assert mixed_requests(200, mix, list(range(10, 1000)), seed=3) == (requests, labels)


def test_disagg_bench_runs_both_setups(tiny_llama: str, tmp_path: os.PathLike) -> None:
    """`bench disagg` on the CPU: one engine, then producer + consumer + proxy (real servers), the same mixed
    requests through each; every request completes and the ratios are reported."""
    result = run_cli(["disagg", "--model", tiny_llama, "--mix", "48:2:1,16:6:2", "--num-prompts", "6", "--request-rate",
                      "20", "--max-model-len", "256", "--disable-tqdm", "--server-args",
                      f"--kv-cache-memory {16 << 20} --dtype float32 --skip-tokenizer-init"], tmp_path)
    for setup in ("colocated", "disaggregated"):
        figures = result["results"][setup]
        assert figures["completed"] == 6 and figures["failed"] == 0
        assert sum(shape["count"] for shape in figures["by_shape"].values()) == 6
    assert result["chat_shape"] == "16x6" and result["results"]["ratios"]["chat_tpot_p99"] > 0
    assert result["results"]["disaggregated"]["pulled_tokens"] >= 16  # through the IpcConnector, streamed after the first
