"""Automatic prefix caching: same greedy tokens with it on as off (float32), real block sharing
(hits counted, n samples sharing their prompt), eviction under memory pressure, clean accounting."""

from __future__ import annotations

import random

import numpy as np

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.core.kv_cache import KVCacheManager
from pagedllm.engine.request import Request
from pagedllm.outputs import RequestOutput
from tests.conftest import assert_clean

VOCAB = 512


def make_llm(path: str, caching: bool, **kwargs: object) -> LLM:
    options: dict = dict(skip_tokenizer_init=True, kv_cache_memory=8 << 20, max_model_len=512, enable_prefix_caching=caching)
    return LLM(path, **(options | kwargs))


def run(llm: LLM, prompts: list[list[int]], max_tokens: list[int], **params: object) -> list[RequestOutput]:
    sampling = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, **params) for m in max_tokens]  # type: ignore[arg-type]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
    assert_clean(llm.llm_engine)
    return outputs


def tokens(outputs: list[RequestOutput]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def shared_system_prompt(rng: random.Random) -> list[list[list[int]]]:
    system = [rng.randrange(3, VOCAB) for _ in range(200)]
    return [[system + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(30)]]


def unique_prompts(rng: random.Random) -> list[list[list[int]]]:
    return [[[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 120))] for _ in range(30)]]


def compare_turns(path: str, turns: int, async_scheduling: bool = False) -> tuple[LLM, list[list[RequestOutput]]]:
    """Multi-turn chats: each turn's prompt is the last prompt + its answer + a new user message;
    every turn must give the same tokens with caching on and off."""
    rng = random.Random(1)
    convs = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(10, 60))] for _ in range(8)]
    cached, plain = make_llm(path, True, async_scheduling=async_scheduling), make_llm(path, False)
    history = []
    for _ in range(turns):
        max_tokens = [rng.randint(5, 20) for _ in convs]
        got, want = run(cached, convs, max_tokens), run(plain, convs, max_tokens)
        assert tokens(got) == tokens(want)
        history.append(got)
        convs = [c + t + [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 30))] for c, t in zip(convs, tokens(got))]
    return cached, history


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("make", [shared_system_prompt, unique_prompts], ids=["shared", "unique"])
def test_caching_on_matches_caching_off(tiny_models: dict[str, str], arch: str, make) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    (prompts,) = make(rng)
    max_tokens = [rng.randint(1, 30) for _ in prompts]
    on, off = make_llm(tiny_models[arch], True), make_llm(tiny_models[arch], False)
    got = run(on, prompts, max_tokens)
    assert tokens(got) == tokens(run(off, prompts, max_tokens))
    stats = on.llm_engine.get_stats()
    if make is shared_system_prompt:
        # The system prompt's 12 full blocks are computed once (by the first request) and hit by the 29 others.
        assert sum(o.num_cached_tokens for o in got) == 29 * 192
        assert stats.prefix_cache_hits == 29 * 192
    else:
        assert stats.prefix_cache_hits == 0
    assert stats.prefix_cache_queries == sum(map(len, prompts))
    assert off.llm_engine.get_stats().prefix_cache_queries == 0


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_multi_turn_chats_reuse_earlier_turns(tiny_models: dict[str, str], async_scheduling: bool) -> None:
    llm, history = compare_turns(tiny_models["llama"], turns=3, async_scheduling=async_scheduling)
    for turn in history[1:]:  # every later turn finds the full blocks of the one before (prompt and answer)
        for output in turn:
            assert output.num_cached_tokens >= (len(output.prompt_token_ids) - 30 - 20 - 1) // 16 * 16 - 16
            assert output.num_cached_tokens > 0


def test_second_identical_request_prefills_only_its_last_partial_block(tiny_models: dict[str, str]) -> None:
    llm = make_llm(tiny_models["llama"], True)
    engine = llm.llm_engine
    for length, hit in ((50, 48), (48, 32)):  # the last token always runs: a 48-token prompt hits 2 of its 3 blocks
        prompt = [random.Random(length).randrange(3, VOCAB) for _ in range(length)]
        first = run(llm, [prompt], [4])[0]
        before = engine.prompt_tokens
        second = run(llm, [prompt], [4])[0]
        assert first.num_cached_tokens == 0 and second.num_cached_tokens == hit
        assert engine.prompt_tokens - before == length - hit
        assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_evicted_blocks_are_never_read_again(tiny_models: dict[str, str]) -> None:
    """A pool of 40 blocks: shared prefixes are cached, pushed out by other traffic, and asked for
    again, over and over; outputs must stay what an engine without caching gives."""
    rng = random.Random(2)
    prefixes = [[rng.randrange(3, VOCAB) for _ in range(100)] for _ in range(4)]
    waves = []
    for _ in range(6):
        waves.append([rng.choice(prefixes) + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 60))] for _ in range(6)])
    on = make_llm(tiny_models["llama"], True, num_gpu_blocks_override=40, max_num_seqs=4)
    off = make_llm(tiny_models["llama"], False, num_gpu_blocks_override=40, max_num_seqs=4)
    for prompts in waves:
        max_tokens = [rng.randint(1, 40) for _ in prompts]
        assert tokens(run(on, prompts, max_tokens)) == tokens(run(off, prompts, max_tokens))
    kv = on.llm_engine.kv_cache
    assert kv.pool.num_evictions > 0 and kv.prefix_hits > 0
    assert on.llm_engine.scheduler.num_preemptions > 0 or kv.pool.num_evictions > 50


def test_n_samples_share_their_prompt_blocks(tiny_models: dict[str, str]) -> None:
    prompt = [random.Random(3).randrange(3, VOCAB) for _ in range(70)]  # 4 full blocks + 6 tokens

    def peak_blocks(llm: LLM, prompts: list[list[int]], n: int) -> tuple[int, list[list[int]]]:
        engine, peak = llm.llm_engine, 0
        params = SamplingParams(n=n, temperature=1.0, seed=7, max_tokens=20, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), {"prompt_token_ids": p}, params)
        finals: list[list[int]] = []
        while engine.has_unfinished_requests():
            peak = max(peak, engine.kv_cache.num_used_blocks)
            finals += [c.token_ids for o in engine.step() if o.finished for c in o.outputs]
        assert_clean(engine)
        return peak, finals

    shared, samples = peak_blocks(make_llm(tiny_models["llama"], True), [prompt], n=4)
    separate, _ = peak_blocks(make_llm(tiny_models["llama"], False), [prompt] * 4, n=1)
    # Each sample holds the 4 shared blocks + its own tail block (6 prompt + 20 output tokens = 2 blocks).
    assert shared == 4 + 4 * 2 and separate == 4 * 6
    assert len(samples) == 4 and len({tuple(s) for s in samples}) > 1


def test_cache_salt_and_reset(tiny_models: dict[str, str]) -> None:
    llm = make_llm(tiny_models["llama"], True)
    prompt = [random.Random(4).randrange(3, VOCAB) for _ in range(40)]

    def cached(**extra: object) -> int:
        out = llm.generate([{"prompt_token_ids": prompt, **extra}], SamplingParams(max_tokens=2), use_tqdm=False)
        return out[0].num_cached_tokens

    assert cached() == 0 and cached() == 32
    assert cached(cache_salt="tenant-a") == 0 and cached(cache_salt="tenant-a") == 32 and cached(cache_salt="tenant-b") == 0
    llm.reset_prefix_cache()
    assert cached() == 0 and cached() == 32
    with pytest.raises(ValueError, match="cache_salt"):
        cached(cache_salt=5)


def test_prompt_logprobs_requests_compute_the_whole_prompt(tiny_models: dict[str, str]) -> None:
    llm = make_llm(tiny_models["llama"], True)
    prompt = [random.Random(5).randrange(3, VOCAB) for _ in range(40)]
    first = run(llm, [prompt], [2], prompt_logprobs=1)[0]
    second = run(llm, [prompt], [2], prompt_logprobs=1)[0]
    assert second.num_cached_tokens == 0
    assert first.prompt_logprobs == second.prompt_logprobs


def make_request(request_id: str, token_ids: list[int]) -> Request:
    return Request(request_id, None, token_ids, SamplingParams(), max_tokens=8)


def test_block_pool_evicts_least_recently_freed_and_drops_their_hashes() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a = make_request("a", list(range(17)))  # 4 full blocks + 1 token: blocks 0-4
    assert kv.allocate_slots("a", 17, kv.find_cached_blocks(a))
    kv.cache_full_blocks(a, 17)
    kv.free("a")
    assert kv.num_used_blocks == 0 and len(kv.pool.cached) == 4  # freed blocks keep their hashes
    # "b" shares a's first two blocks; its 3 new blocks come from the unhashed ones (4, 5), then
    # from the cached block freed first: a's last full block (3), whose hash goes.
    b = make_request("b", list(range(8)) + [99] * 9)
    hit = kv.find_cached_blocks(b)
    assert hit == [0, 1]
    assert kv.allocate_slots("b", 17, hit)
    kv.cache_full_blocks(b, 17)
    assert kv.get_block_table("b") == [0, 1, 4, 5, 3] and kv.pool.num_evictions == 1
    assert kv.pool.ref_counts[:2] == [1, 1]
    kv.pool.check()
    assert not kv.allocate_slots("c", 8)  # one free block left, two needed: no change
    kv.pool.check()
    kv.free("b")
    assert kv.num_used_blocks == 0
    kv.pool.check()
    # a's prompt again finds the three blocks that survived, in order.
    assert kv.find_cached_blocks(make_request("a2", list(range(17)))) == [0, 1, 2]
    kv.reset_prefix_cache()
    assert not kv.pool.cached and kv.find_cached_blocks(make_request("a3", list(range(17)))) == []


def test_decode_batches_find_their_common_prefix(tiny_models: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The host finds the whole blocks that every request of a decode batch shares (what the CUDA
    backend attends once for all of them); outputs stay those of caching off."""
    import pagedllm.worker.model_runner as model_runner
    from pagedllm.worker.input_batch import build_batch

    found: list[int] = []

    def recording(*args: object) -> object:
        batch = build_batch(*args)  # type: ignore[arg-type]
        found.append(batch.common_prefix_len if batch.num_decodes == len(batch.seq_lens) else -1)
        return batch

    monkeypatch.setattr(model_runner, "build_batch", recording)
    rng = random.Random(4)
    system = [rng.randrange(3, VOCAB) for _ in range(100)]  # 6 whole blocks of 16, and 4 tokens
    prompts = [system + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    cached, plain = make_llm(tiny_models["llama"], True), make_llm(tiny_models["llama"], False)
    cached.llm_engine.runner.backend.shared_prefix_min = (4, 32)  # the torch backend ignores the prefix
    got = tokens(run(cached, prompts, [8] * 6))
    decodes = [n for n in found if n >= 0]
    assert decodes and set(decodes) == {96}
    assert got == tokens(run(plain, prompts, [8] * 6))
    found.clear()
    run(cached, [[rng.randrange(3, VOCAB) for _ in range(50)] for _ in range(6)], [8] * 6)  # nothing shared
    assert found and set(found) <= {0, -1}


def test_common_prefix_stops_at_the_first_difference_and_the_shortest_context() -> None:
    from pagedllm.worker.input_batch import common_prefix_len

    tables = np.array([[5, 6, 7, 8, 0], [5, 6, 7, 9, 1], [5, 6, 7, 8, 2]])
    assert common_prefix_len(tables, np.array([80, 80, 80]), 16) == 48  # column 3 differs
    assert common_prefix_len(tables, np.array([80, 33, 80]), 16) == 32  # the second's last token is in block 2
    assert common_prefix_len(tables, np.array([80, 32, 80]), 16) == 16
    assert common_prefix_len(tables[:, [4]], np.array([80, 80, 80]), 16) == 0
    assert common_prefix_len(tables[[0, 2]], np.array([80, 80]), 16) == 64
    # min_tokens: fewer shared tokens count as none, whether column need - 1 differs or a later one
    assert common_prefix_len(tables, np.array([80, 80, 80]), 16, min_tokens=48) == 48
    assert common_prefix_len(tables, np.array([80, 80, 80]), 16, min_tokens=49) == 0
    assert common_prefix_len(tables[[0, 2]], np.array([80, 80]), 16, min_tokens=40) == 64
    assert common_prefix_len(tables[[0, 2]], np.array([80, 40]), 16, min_tokens=40) == 0  # past the shortest context
