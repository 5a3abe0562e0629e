"""Mistral (sliding window), Gemma 2, Gemma 3 and Phi-3: greedy outputs equal transformers' token for token
(float32, CPU) on tiny random models, alone and in mixed batches with chunked prefill, prefix caching on (prompts
sharing a prefix longer than the window) and async scheduling. Most prompts are longer than the models' 16-32 token
windows, so the windowed layers' masks decide the outputs (without them they differ)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from pagedllm import LLM, SamplingParams
from tests.conftest import assert_clean
from tests.reference.models import HFOracle, make_tiny_model

FAMILIES = ["mistral-sw", "gemma2", "gemma3", "phi3"]
VOCAB = 512


@dataclass
class Workload:
    path: str
    prompts: list[list[int]]
    max_tokens: list[int]
    expected: list[list[int]]


@pytest.fixture(scope="module", params=FAMILIES)
def workload(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Workload:
    path = make_tiny_model(request.param, str(tmp_path_factory.mktemp("families") / request.param))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (1, 9, 16, 17, 45, 70, 100)]
    shared = prompts[-1][:64]  # four whole blocks, past the window: cached blocks the window has moved beyond
    prompts += [shared + [rng.randrange(3, VOCAB) for _ in range(n)] for n in (3, 20)]
    max_tokens = [rng.randint(4, 14) for _ in prompts]
    oracle = HFOracle(path)
    oracle.model.generation_config.eos_token_id = None  # as ignore_eos
    expected = [oracle.greedy(p, m) for p, m in zip(prompts, max_tokens)]
    return Workload(path, prompts, max_tokens, expected)


def generate(llm: LLM, w: Workload, indices: list[int]) -> list[list[int]]:
    params = [SamplingParams(temperature=0.0, max_tokens=w.max_tokens[i], ignore_eos=True) for i in indices]
    outputs = llm.generate([{"prompt_token_ids": w.prompts[i]} for i in indices], params, use_tqdm=False)
    assert_clean(llm.llm_engine)
    return [o.outputs[0].token_ids for o in outputs]


def test_alone(workload: Workload) -> None:
    llm = LLM(workload.path, skip_tokenizer_init=True, kv_cache_memory=8 << 20, enable_prefix_caching=False)
    for i in range(len(workload.prompts)):
        assert generate(llm, workload, [i]) == [workload.expected[i]], f"prompt {i}"


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_mixed_batch_chunked_prefix_cached(workload: Workload, async_scheduling: bool) -> None:
    # 24-token steps chunk every long prompt across block and window boundaries; the second pass hits the cache.
    llm = LLM(workload.path, skip_tokenizer_init=True, kv_cache_memory=8 << 20, max_num_batched_tokens=24,
              enable_prefix_caching=True, async_scheduling=async_scheduling)
    order = list(range(len(workload.prompts)))
    random.Random(1).shuffle(order)
    for _ in range(2):
        for i, tokens in zip(order, generate(llm, workload, order)):
            assert tokens == workload.expected[i], f"prompt {i}"
    assert llm.llm_engine.kv_cache.prefix_hits > 0  # the cache served shared prefixes and the second pass


def test_sliding_window_gives_blocks_back(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Mistral's window on every layer: a request holds about window / block_size + 2 blocks however long it runs
    (prompt chunks and decodes), the outputs still equal transformers', and the pool is whole again after; Gemma's
    global layers need every block, so nothing is given back there."""
    path = make_tiny_model("mistral-sw", str(tmp_path_factory.mktemp("families") / "mistral-window"))
    rng = random.Random(3)
    prompt = [rng.randrange(3, VOCAB) for _ in range(90)]
    oracle = HFOracle(path)
    oracle.model.generation_config.eos_token_id = None
    llm = LLM(path, skip_tokenizer_init=True, kv_cache_memory=8 << 20, max_num_batched_tokens=24)
    kv = llm.llm_engine.kv_cache
    assert kv.sliding_window == 16
    peak = 0
    step = llm.llm_engine.step

    def recording_step():  # type: ignore[no-untyped-def]
        nonlocal peak
        out = step()
        peak = max(peak, kv.num_used_blocks)
        return out

    llm.llm_engine.step = recording_step  # type: ignore[method-assign]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    tokens = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids
    assert tokens == oracle.greedy(prompt, 40)
    assert peak <= 16 // 16 + 1 + 24 // 16 + 1, peak  # the window's blocks, a partial one, a 24-token chunk's
    assert kv.num_free_blocks == kv.num_blocks
    assert_clean(llm.llm_engine)
    gemma = make_tiny_model("gemma2", str(tmp_path_factory.mktemp("families") / "gemma-window"))
    assert LLM(gemma, skip_tokenizer_init=True, kv_cache_memory=8 << 20).llm_engine.kv_cache.sliding_window is None
