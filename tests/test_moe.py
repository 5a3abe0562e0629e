"""Mixture-of-experts models (Qwen2-MoE with its shared expert, Qwen3-MoE with a dense layer among the sparse ones,
Mixtral): greedy outputs token-identical to transformers in float32 on CPU, alone and in a mixed batch, with chunked
prefill, preemption and async scheduling; under TP=2 (each expert's intermediate rows split over the ranks) and
expert parallelism (whole experts per rank); and random ("dummy") weights give the same model whatever the layout."""

from __future__ import annotations

import random

import pytest

from pagedllm import LLM
from pagedllm.distributed.parallel_state import ParallelState, building
from pagedllm.layers.moe import FusedMoE
from tests.reference.models import make_tiny_model
from tests.test_correctness import Workload, make_workload, run

ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral"]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_moe")
    return {arch: make_tiny_model(arch, str(root / arch)) for arch in ARCHS}


@pytest.fixture(scope="module")
def workloads(moe_models: dict[str, str]) -> dict[str, Workload]:
    return {arch: make_workload(path, 512, n=8, ignore_eos=True, max_out=16) for arch, path in moe_models.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(workloads: dict[str, Workload], arch: str) -> None:
    w = workloads[arch]
    llm = LLM(w.path, skip_tokenizer_init=True, kv_cache_memory=64 << 20)
    for i in range(3):  # alone: a 1-token prompt, a 300-token one, another
        assert run(llm, w, [i]) == [w.expected[i]], f"prompt {i}"
    order = list(range(len(w.prompts)))
    random.Random(1).shuffle(order)
    assert run(llm, w, order) == [w.expected[i] for i in order]


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_preemption_async(workloads: dict[str, Workload], arch: str) -> None:
    """20 blocks (320 tokens) cannot hold the batch; 64-token steps chunk the long prompts."""
    w = workloads[arch]
    probe = LLM(w.path, skip_tokenizer_init=True, kv_cache_memory=64 << 20)
    block_bytes = probe.llm_engine.runner.kv_bytes_per_block()
    del probe
    llm = LLM(w.path, skip_tokenizer_init=True, kv_cache_memory=20 * block_bytes, max_num_batched_tokens=64,
              max_num_seqs=8, async_scheduling=True)
    assert run(llm, w, list(range(len(w.prompts)))) == w.expected
    assert llm.llm_engine.scheduler.num_preemptions > 0


def test_tensor_parallel(workloads: dict[str, Workload]) -> None:
    """TP=2 (the shared expert and the dense MLP split too): transformers' tokens."""
    w = workloads["qwen2_moe"]
    llm = LLM(w.path, skip_tokenizer_init=True, tensor_parallel_size=2, max_num_batched_tokens=64, max_num_seqs=8,
              num_gpu_blocks_override=40, max_model_len=512)
    try:
        assert run(llm, w, list(range(len(w.prompts)))) == w.expected
    finally:
        llm.llm_engine.shutdown()


def test_dummy_weights_same_model_under_tp(moe_models: dict[str, str]) -> None:
    """Each expert's full tensor is drawn from its name's seed and sliced like a checkpoint's."""
    args = dict(skip_tokenizer_init=True, load_format="dummy", max_num_batched_tokens=64, num_gpu_blocks_override=40,
                max_model_len=512)
    w = Workload(moe_models["mixtral"], [[5 + i] * (10 + 20 * i) for i in range(4)], [8] * 4, True, [])
    single = run(LLM(w.path, **args), w, list(range(4)))
    llm = LLM(w.path, tensor_parallel_size=2, **args)
    try:
        assert run(llm, w, list(range(4))) == single
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_expert_parallel(moe_models: dict[str, str], workloads: dict[str, Workload], arch: str) -> None:
    """EP over 2 ranks (4 whole experts each): transformers' tokens from the checkpoint, and dummy weights give the
    TP=1 model."""
    w = workloads[arch]
    args = dict(skip_tokenizer_init=True, tensor_parallel_size=2, enable_expert_parallel=True,
                max_num_batched_tokens=64, max_num_seqs=8, num_gpu_blocks_override=40, max_model_len=512)
    llm = LLM(w.path, **args)
    try:
        moe = [m for m in llm.llm_engine.runner.model.modules() if isinstance(m, FusedMoE)]
        assert moe and all(m.w13.shape[:2] == (4, 2 * m.shard.rows) for m in moe)  # rank 0: experts 0-3, whole
        assert run(llm, w, list(range(len(w.prompts)))) == w.expected
    finally:
        llm.llm_engine.shutdown()
    d = Workload(moe_models[arch], [[5 + i] * (10 + 20 * i) for i in range(4)], [8] * 4, True, [])
    single = run(LLM(d.path, skip_tokenizer_init=True, load_format="dummy", max_num_batched_tokens=64,
                     num_gpu_blocks_override=40, max_model_len=512), d, list(range(4)))
    llm = LLM(d.path, load_format="dummy", **args)
    try:
        assert run(llm, d, list(range(4))) == single
    finally:
        llm.llm_engine.shutdown()


def test_expert_parallel_needs_divisible_experts(moe_models: dict[str, str]) -> None:
    """8 experts over 3 ranks: refused before any rank starts, and by the layer itself."""
    with pytest.raises(ValueError, match="8 experts to divide evenly over tensor_parallel_size=3"):
        LLM(moe_models["mixtral"], skip_tokenizer_init=True, tensor_parallel_size=3, enable_expert_parallel=True)
    with building(ParallelState(rank=1, tp_size=3)), pytest.raises(ValueError, match="divide evenly"):
        FusedMoE(8, 2, 64, 32, True, expert_parallel=True)
