"""Greedy outputs must equal transformers' greedy generate token for token (float32, CPU):
alone, inside large mixed batches, under preemption and with chunked prefill; with async
scheduling too (tiny models, plus SmolLM2's mixed batch, where EOS ends requests mid-flight)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.conftest import assert_clean
from tests.reference.models import HFOracle


@dataclass
class Workload:
    path: str
    prompts: list[list[int]]
    max_tokens: list[int]
    ignore_eos: bool
    expected: list[list[int]]


def make_workload(path: str, vocab: int, n: int, ignore_eos: bool, max_out: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    lengths = [1, 300] + [rng.randint(1, 300) for _ in range(n - 2)]
    prompts = [[rng.randrange(3, vocab) for _ in range(length)] for length in lengths]
    max_tokens = [rng.randint(1, max_out) for _ in range(n)]
    oracle = HFOracle(path)
    if ignore_eos:  # generate past EOS, as ignore_eos does (no masking, no stopping)
        oracle.model.generation_config.eos_token_id = None
    expected = [oracle.greedy(p, m, eos=not ignore_eos) for p, m in zip(prompts, max_tokens)]
    return Workload(path, prompts, max_tokens, ignore_eos, expected)


def run(llm: LLM, w: Workload, indices: list[int]) -> list[list[int]]:
    params = [SamplingParams(temperature=0.0, max_tokens=w.max_tokens[i], ignore_eos=w.ignore_eos) for i in indices]
    outputs = llm.generate([{"prompt_token_ids": w.prompts[i]} for i in indices], params, use_tqdm=False)
    assert_clean(llm.llm_engine)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "smollm2"])
def workload(request: pytest.FixtureRequest) -> Workload:
    if request.param == "smollm2":
        path = request.getfixturevalue("smollm2")
        return make_workload(path, 49152, n=32, ignore_eos=False, max_out=24)
    path = request.getfixturevalue("tiny_models")[request.param]
    return make_workload(path, 512, n=40, ignore_eos=True, max_out=40)


ASYNC = pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])


def skip_slow_async(workload: Workload, async_scheduling: bool) -> None:
    if async_scheduling and "tiny" not in workload.path:
        pytest.skip("async variant runs on the tiny models only, to keep the suite short")


@ASYNC
def test_alone(workload: Workload, async_scheduling: bool) -> None:
    skip_slow_async(workload, async_scheduling)
    llm = LLM(workload.path, skip_tokenizer_init=True, kv_cache_memory=64 << 20, async_scheduling=async_scheduling)
    indices = range(len(workload.prompts)) if "tiny" in workload.path else range(0, len(workload.prompts), 4)
    for i in indices:
        assert run(llm, workload, [i]) == [workload.expected[i]], f"prompt {i}"


@ASYNC
def test_mixed_batch(workload: Workload, async_scheduling: bool) -> None:
    llm = LLM(workload.path, skip_tokenizer_init=True, kv_cache_memory=64 << 20, async_scheduling=async_scheduling)
    order = list(range(len(workload.prompts)))
    random.Random(1).shuffle(order)
    got = run(llm, workload, order)
    for i, tokens in zip(order, got):
        assert tokens == workload.expected[i], f"prompt {i}"


@ASYNC
def test_preemption_and_chunked_prefill(workload: Workload, async_scheduling: bool) -> None:
    skip_slow_async(workload, async_scheduling)
    # A pool of 24 blocks (384 tokens) cannot hold the batch, and 64-token steps chunk every long prompt.
    probe = LLM(workload.path, skip_tokenizer_init=True, kv_cache_memory=64 << 20)
    block_bytes = probe.llm_engine.runner.kv_bytes_per_block()
    del probe
    llm = LLM(workload.path, skip_tokenizer_init=True, kv_cache_memory=24 * block_bytes, max_num_batched_tokens=64, max_num_seqs=16,
              async_scheduling=async_scheduling)
    assert llm.llm_engine.kv_cache.num_blocks == 24
    got = run(llm, workload, list(range(len(workload.prompts))))
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert got == workload.expected


def test_logprobs_match_transformers(tiny_models: dict[str, str], smollm2: str) -> None:
    for path, vocab, async_scheduling in ((tiny_models["qwen3"], 512, False), (tiny_models["qwen3"], 512, True), (smollm2, 49152, False)):
        oracle = HFOracle(path)
        rng = random.Random(2)
        prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 40))] for _ in range(4)]
        llm = LLM(path, skip_tokenizer_init=True, kv_cache_memory=64 << 20, max_num_batched_tokens=32, async_scheduling=async_scheduling)
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=2)
        for prompt, out in zip(prompts, llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)):
            completion = out.outputs[0]
            ref = oracle.logprobs(prompt + completion.token_ids)
            for j, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
                position = len(prompt) - 1 + j
                assert abs(entry[token].logprob - ref[position, token].item()) < 1e-4
                assert entry[token].rank == 1  # greedy
                top = torch.topk(ref[position], 3)
                for tid, value in zip(top.indices.tolist(), top.values.tolist()):
                    assert abs(entry[tid].logprob - value) < 1e-4
            assert abs(completion.cumulative_logprob - sum(ref[len(prompt) - 1 + j, t].item() for j, t in enumerate(completion.token_ids))) < 1e-3
            assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
            assert len(out.prompt_logprobs) == len(prompt)
            for p in range(1, len(prompt)):
                assert abs(out.prompt_logprobs[p][prompt[p]].logprob - ref[p - 1, prompt[p]].item()) < 1e-4
        assert_clean(llm.llm_engine)
