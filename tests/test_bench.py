"""`pagedllm bench`: the CLI end to end on tiny models (both backends), the named workloads, the bundled shapes."""

from __future__ import annotations

import argparse
import json
import os
import random

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
