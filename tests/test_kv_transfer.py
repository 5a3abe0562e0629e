"""The KV tier beyond the GPU pool (pagedllm/kv_transfer/), float32 on CPU: the host-memory tier of the prefix cache
gives the same greedy tokens as no tier, with a GPU pool small enough that blocks are evicted and preempted, serves
prefixes back after the GPU prefix cache is reset (cached tokens reported, external hits counted), and works under
tensor parallelism; two engines in one process hand prompts over TCP (a producer prefills, a consumer pulls the blocks
and decodes) with the tokens of one engine, and the consumer prefills locally when the producer is gone or its blocks
do not match."""

from __future__ import annotations

import random
from typing import Any

import pytest

from pagedllm import LLM, SamplingParams
from tests.conftest import assert_clean

ARGS = dict(skip_tokenizer_init=True, max_model_len=512, max_num_batched_tokens=64)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _prompts(seed: int, n: int = 14) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 500) for _ in range(40)]  # a common head: prefix hits within a round too
    return [{"prompt_token_ids": (shared if i % 3 == 0 else []) + [rng.randrange(3, 500) for _ in range(rng.randint(3, 110))]}
            for i in range(n)]


def _tokens(llm: LLM, prompts: list[dict[str, Any]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference(tiny_models: dict[str, str]) -> tuple[list[dict[str, Any]], list[list[int]]]:
    prompts = _prompts(0)
    return prompts, _tokens(LLM(tiny_models["llama"], num_gpu_blocks_override=200, **ARGS), prompts)


def test_host_tier_equals_no_tier(tiny_models: dict[str, str], reference: tuple) -> None:
    prompts, expected = reference
    llm = LLM(tiny_models["llama"], num_gpu_blocks_override=20, kv_offload_bytes=4 << 20, **ARGS)
    tier = llm.llm_engine.kv_cache.host_tier
    assert tier is not None and tier.num_slots > 40
    for _ in range(3):  # rounds 2 and 3 find most prompt blocks only in the host tier (20 GPU blocks hold few)
        assert _tokens(llm, prompts) == expected
        assert_clean(llm.llm_engine)
    assert tier.hits > 0 and llm.llm_engine.scheduler.num_preemptions > 0
    llm.reset_prefix_cache()
    outputs = llm.generate(prompts[:3], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected[:3]
    assert all(o.num_cached_tokens >= 16 * ((len(p["prompt_token_ids"]) - 1) // 16) for o, p in zip(outputs, prompts))
    metrics = {m.name: m for m in llm.get_metrics()}
    assert metrics["pagedllm:external_prefix_cache_hits"].value == tier.hits > 0


def test_host_tier_under_tensor_parallelism(tiny_models: dict[str, str], reference: tuple) -> None:
    prompts, expected = reference
    llm = LLM(tiny_models["llama"], num_gpu_blocks_override=24, kv_offload_bytes=2 << 20, tensor_parallel_size=2, **ARGS)
    try:
        for _ in range(2):
            assert _tokens(llm, prompts) == expected
        assert llm.llm_engine.kv_cache.host_tier.hits > 0
    finally:
        llm.llm_engine.shutdown()


def _connector(role: str, **extra: Any) -> dict[str, Any]:
    return {"kv_connector": "TcpConnector", "kv_role": role, "kv_port": 0,
            "kv_connector_extra_config": {"kv_offload_bytes": 4 << 20, **extra}}


def test_disaggregated_prefill_over_tcp(tiny_models: dict[str, str], reference: tuple) -> None:
    prompts, expected = reference
    path = tiny_models["llama"]
    producer = LLM(path, kv_transfer_config=_connector("kv_producer"), num_gpu_blocks_override=200, **ARGS)
    server = producer.llm_engine.kv_connector.server
    prefill = SamplingParams(temperature=0, max_tokens=1, extra_args={"kv_transfer_params": {"do_remote_decode": True}})
    producer.generate(prompts, prefill, use_tqdm=False)
    remote = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": server.port}
    decode = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, extra_args={"kv_transfer_params": remote})
    consumer = LLM(path, kv_transfer_config=_connector("kv_consumer"), num_gpu_blocks_override=60, **ARGS)
    outputs = consumer.generate(prompts, decode, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    received = consumer.llm_engine.kv_connector.puller.received_blocks
    assert received == sum((len(p["prompt_token_ids"]) - 1) // 16 for p in prompts)  # every prompt's full blocks
    assert all(o.num_cached_tokens >= 16 * ((len(p["prompt_token_ids"]) - 1) // 16) for o, p in zip(outputs, prompts))
    assert_clean(consumer.llm_engine)

    # Blocks of another layout are refused (and prefilled locally); so are prompts whose producer is gone.
    other = LLM(path, kv_transfer_config=_connector("kv_consumer"), block_size=32, num_gpu_blocks_override=40, **ARGS)
    assert _tokens(other, prompts[:4], decode) == expected[:4]
    puller = other.llm_engine.kv_connector.puller
    assert puller.received_blocks == 0 and "refused" in puller.last_error and "block_size" in puller.last_error
    server.close()
    fresh = LLM(path, kv_transfer_config=_connector("kv_consumer"), num_gpu_blocks_override=60, **ARGS)
    assert _tokens(fresh, prompts, decode) == expected
    assert fresh.llm_engine.kv_connector.puller.last_error is not None
    assert_clean(fresh.llm_engine)


def test_config_errors(tiny_models: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="kv_connector"):
        LLM(tiny_models["llama"], kv_transfer_config={"kv_connector": "NixlConnector"}, **ARGS)
    with pytest.raises(ValueError, match="one rank"):
        LLM(tiny_models["llama"], kv_transfer_config=_connector("kv_both"), tensor_parallel_size=2, **ARGS)
    with pytest.raises(ValueError, match="kv_offload_bytes"):
        LLM(tiny_models["llama"], kv_offload_bytes=100, **ARGS)
