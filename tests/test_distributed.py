"""Tensor and pipeline parallelism on CPU (gloo, one process per rank): greedy outputs token-identical
to one process on the tiny random-weight models, in a mixed batch with chunked prefill and preemption
(the tiny Qwen2 has one KV head, so TP=2 replicates it); sampling, logprobs and async scheduling
through the parallel path; a rank that dies fails the engine instead of hanging it; and a script without a main
guard starts its ranks like any other."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.executor.workers import WorkerDiedError
from tests.conftest import assert_clean

ENGINE_ARGS = dict(skip_tokenizer_init=True, max_num_batched_tokens=64, max_num_seqs=16, num_gpu_blocks_override=40, max_model_len=512)
GetLLM = Callable[..., LLM]


@pytest.fixture(scope="module")
def parallel_llm() -> Iterator[GetLLM]:
    """`get(path, **kwargs)`: an LLM with ENGINE_ARGS. One world per process means one parallel engine
    alive at a time; consecutive tests that ask for the same one share it (starting one costs seconds)."""
    current: dict[str, Any] = {}

    def get(path: str, **kwargs: Any) -> LLM:
        key = (path, sorted(kwargs.items()))
        if current.get("key") != key:
            if "llm" in current:
                current.pop("llm").llm_engine.shutdown()
            current["llm"], current["key"] = LLM(path, **{**ENGINE_ARGS, **kwargs}), key
        return current["llm"]

    yield get
    if "llm" in current:
        current["llm"].llm_engine.shutdown()


def workload(seed: int = 0, n: int = 16) -> tuple[list[dict], list[SamplingParams]]:
    rng = random.Random(seed)
    lengths = [1, 200] + [rng.randint(1, 200) for _ in range(n - 2)]
    prompts = [{"prompt_token_ids": [rng.randrange(3, 512) for _ in range(length)]} for length in lengths]
    return prompts, [SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 24), ignore_eos=True) for _ in range(n)]


def generate(llm: LLM, prompts: list[dict], params: list[SamplingParams]) -> list:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert_clean(llm.llm_engine)
    return outputs


_reference: dict[tuple, list[list[int]]] = {}


def reference_tokens(path: str, load_format: str = "auto") -> list[list[int]]:
    """One process's greedy tokens (which test_correctness holds equal to transformers')."""
    key = (path, load_format)
    if key not in _reference:
        llm = LLM(path, load_format=load_format, **ENGINE_ARGS)
        _reference[key] = [o.outputs[0].token_ids for o in generate(llm, *workload())]
    return _reference[key]


@pytest.mark.parametrize(
    "arch, tp, pp, extra",
    [
        ("llama", 2, 1, {}),
        ("qwen2", 2, 1, {}),  # 1 KV head, replicated on both ranks
        ("qwen3", 2, 1, {}),
        ("llama", 1, 2, {}),
        ("qwen2", 1, 2, {}),  # tied embeddings: the last stage holds its own copy for the LM head
        ("qwen2", 2, 1, {"load_format": "dummy"}),  # random weights: the same model whatever the layout
        ("llama", 2, 1, {"async_scheduling": True}),  # tokens in flight reach the other TP rank
        ("qwen3", 2, 2, {"async_scheduling": True}),  # two micro-batches in flight, of other requests each
    ],
    ids=["llama-tp2", "qwen2-tp2", "qwen3-tp2", "llama-pp2", "qwen2-pp2", "qwen2-tp2-dummy", "llama-tp2-async", "qwen3-tp2pp2-async"],
)
def test_greedy_matches_one_process(parallel_llm: GetLLM, tiny_models: dict[str, str], arch: str, tp: int, pp: int, extra: dict) -> None:
    path = tiny_models[arch]
    expected = reference_tokens(path, str(extra.get("load_format", "auto")))
    llm = parallel_llm(path, tensor_parallel_size=tp, pipeline_parallel_size=pp, **extra)
    assert [o.outputs[0].token_ids for o in generate(llm, *workload())] == expected
    assert llm.llm_engine.scheduler.num_preemptions > 0  # the 40-block pool cannot hold the whole batch


def test_pipeline_keeps_one_micro_batch_per_stage_in_flight(parallel_llm: GetLLM, tiny_models: dict[str, str]) -> None:
    """PP=2 with async scheduling: up to two steps in flight, never sharing a request."""
    llm = parallel_llm(tiny_models["qwen3"], tensor_parallel_size=2, pipeline_parallel_size=2, async_scheduling=True)
    engine = llm.llm_engine
    launch = engine.runner.execute
    depths = []

    def checked(sched: Any, kv_cache: Any, prev: Any = None) -> Any:
        assert prev is None  # no token in flight is read: the step's requests have none
        in_flight = {id(r) for handle in engine._inflight for r in handle.requests}
        assert not in_flight & {id(r) for r, _ in sched.scheduled}
        depths.append(len(engine._inflight))
        return launch(sched, kv_cache, prev)

    engine.runner.execute = checked  # type: ignore[method-assign]
    try:
        generate(llm, *workload(seed=5))
    finally:
        del engine.runner.execute
    assert max(depths) == 2


def test_sampling_and_logprobs_match_one_process(parallel_llm: GetLLM, tiny_models: dict[str, str]) -> None:
    """Seeded sampling, logprobs and prompt logprobs run once, on the driver, from the gathered logits."""
    prompts, _ = workload(seed=3, n=6)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=6, logprobs=3, prompt_logprobs=2, ignore_eos=True)] * 6
    single = generate(LLM(tiny_models["qwen3"], **ENGINE_ARGS), prompts, params)
    # The engine of the test before (the same layout): not started again.
    parallel = generate(parallel_llm(tiny_models["qwen3"], tensor_parallel_size=2, pipeline_parallel_size=2, async_scheduling=True),
                        prompts, params)
    for a, b in zip(single, parallel):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys() and all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert x.keys() == y.keys() and all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)


def test_heads_split_in_whole_kv_groups() -> None:
    """KV heads that do not divide evenly go to the first ranks one more each, with the q heads that attend
    to them (SmolLM2: 9 heads, 3 KV heads, TP=2 -> 6 + 3 q heads, 2 + 1 KV heads); fewer KV heads than
    ranks are replicated."""
    from pagedllm.distributed.parallel_state import ParallelState, building
    from pagedllm.layers.linear import Shard, qkv_shards

    def shards(tp: int, heads: int, kv_heads: int) -> list[tuple[Shard, Shard]]:
        out = []
        for rank in range(tp):
            with building(ParallelState(rank=rank, tp_size=tp)):
                q, k, v = qkv_shards(1, heads, kv_heads)
            assert k == v
            out.append(((q.start, q.size), (k.start, k.size)))
        return out

    assert shards(2, 9, 3) == [((0, 6), (0, 2)), ((6, 3), (2, 1))]
    assert shards(3, 9, 3) == [((0, 3), (0, 1)), ((3, 3), (1, 1)), ((6, 3), (2, 1))]
    assert shards(4, 8, 2) == [((0, 2), (0, 1)), ((2, 2), (0, 1)), ((4, 2), (1, 1)), ((6, 2), (1, 1))]
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        shards(3, 4, 2)


def test_smollm2_uneven_heads_match_one_process(parallel_llm: GetLLM, smollm2: str) -> None:
    """SmolLM2's 9 heads / 3 KV heads over TP=2 (uneven: 6 + 3), float32 greedy: the single-process tokens."""
    prompts = [{"prompt_token_ids": ids} for ids in ([1, 504, 3458, 282, 4082, 314], [1, 28, 17, 2366, 30, 5099, 9043, 11], [1] + list(range(300, 380)))]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    single = [o.outputs[0].token_ids for o in generate(LLM(smollm2, **ENGINE_ARGS), prompts, [params] * 3)]
    llm = parallel_llm(smollm2, tensor_parallel_size=2)
    assert [o.outputs[0].token_ids for o in generate(llm, prompts, [params] * 3)] == single


def test_invalid_layouts_are_rejected(tiny_models: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        LLM(tiny_models["llama"], tensor_parallel_size=3, **ENGINE_ARGS)
    with pytest.raises(ValueError, match="pipeline_parallel_size=4"):
        LLM(tiny_models["llama"], pipeline_parallel_size=4, **ENGINE_ARGS)
    with pytest.raises(ValueError, match="data_parallel_size"):
        LLM(tiny_models["llama"], data_parallel_size=2, **ENGINE_ARGS)


def test_dead_worker_fails_the_engine(parallel_llm: GetLLM, tiny_models: dict[str, str]) -> None:
    engine = parallel_llm(tiny_models["llama"], tensor_parallel_size=2, max_num_seqs=4).llm_engine
    assert engine.workers is not None
    failures: list[BaseException] = []
    engine.on_failure(failures.append)
    for i in range(4):
        engine.add_request(str(i), {"prompt_token_ids": [5 + i] * 20}, SamplingParams(max_tokens=400, ignore_eos=True))
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            for step in range(10_000):
                if step == 5:
                    os.kill(engine.workers.pids[0], signal.SIGKILL)  # type: ignore[union-attr]
                engine.step()
        except BaseException as error:  # noqa: BLE001 - what the test looks at
            errors.append(error)

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the engine hung after its worker died"
    assert errors and isinstance(errors[0], (WorkerDiedError, RuntimeError))
    deadline = time.monotonic() + 10
    while not failures and time.monotonic() < deadline:
        time.sleep(0.05)
    assert failures and "exited with code -9" in str(failures[0])
    with pytest.raises(WorkerDiedError):
        engine.step()
    start = time.monotonic()
    engine.shutdown()
    assert time.monotonic() - start < 30


def _worker_pids(engine: Any) -> list[int]:
    return engine.workers.pids


def test_dead_worker_fails_requests_and_health(tiny_models: dict[str, str]) -> None:
    """Behind the server: a rank of the core's world dies, the core exits, the in-flight stream ends with an
    engine_dead error and /health turns 503."""
    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_engine import AsyncLLM
    from pagedllm.entrypoints.openai.api_server import ServerSettings, build_app
    from tests.test_server import COMPLETIONS, sse_events

    config = EngineConfig(model=tiny_models["qwen3"], tensor_parallel_size=2, **{**ENGINE_ARGS, "max_num_seqs": 4})
    async_engine = AsyncLLM.create(config)
    app = build_app(async_engine, ServerSettings(model_names=["tiny"]))

    async def scenario() -> None:
        async_engine.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tiny") as http:
                assert (await http.get("/health")).status_code == 200
                [pid] = await async_engine.call_engine(_worker_pids)

                async def kill_soon() -> None:
                    while async_engine.stats.generation_tokens < 5:
                        await asyncio.sleep(0.01)
                    os.kill(pid, signal.SIGKILL)

                body = {"prompt": [5, 6, 7], "max_tokens": 480, "ignore_eos": True, "stream": True}
                streamed, _ = await asyncio.gather(http.post(COMPLETIONS, json=body), kill_soon())
                events = sse_events(streamed.text)
                assert "error" in events[-2] and events[-2]["error"]["code"] == "engine_dead"
                assert (await http.get("/health")).status_code == 503
        finally:
            await async_engine.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 120))


# A plain script, no `if __name__ == "__main__":` (issue 22): the spawned ranks must not run it again.
UNGUARDED_SCRIPT = """\
from pagedllm import LLM, SamplingParams

llm = LLM({path!r}, tensor_parallel_size=2, skip_tokenizer_init=True, kv_cache_memory=16 << 20)
outputs = llm.generate({prompts!r}, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
print("TOKENS", [list(o.outputs[0].token_ids) for o in outputs])
"""


def test_script_without_main_guard(tiny_models: dict[str, str], tmp_path: Path) -> None:
    prompts = [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": list(range(40, 90))}]
    script = tmp_path / "generate.py"
    script.write_text(UNGUARDED_SCRIPT.format(path=tiny_models["llama"], prompts=prompts))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, text=True, capture_output=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    single = LLM(tiny_models["llama"], skip_tokenizer_init=True, kv_cache_memory=16 << 20)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = [list(o.outputs[0].token_ids) for o in single.generate(prompts, params, use_tqdm=False)]
    assert f"TOKENS {expected}" in result.stdout.splitlines()


def test_ray_tensor_parallel(parallel_llm: GetLLM, tiny_models: dict[str, str]) -> None:
    """The ranks as Ray actors in a placement group, on a local one-node cluster (skipped without Ray:
    `pip install -e ".[ray]"`, then `python -m pytest -q tests/test_distributed.py -k ray`)."""
    ray = pytest.importorskip("ray")
    path = tiny_models["llama"]
    expected = reference_tokens(path)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=100 << 20)
    try:
        llm = parallel_llm(path, tensor_parallel_size=2, distributed_executor_backend="ray")
        assert llm.llm_engine.workers is not None and llm.llm_engine.workers.backend == "ray"
        assert [o.outputs[0].token_ids for o in generate(llm, *workload())] == expected
        llm.llm_engine.shutdown()  # before the cluster goes
    finally:
        ray.shutdown()


def test_small_all_reduce_dispatch_and_fallback() -> None:
    """Small TP all-reduces go to the symmetric-memory path when it is set and the message fits, NCCL
    otherwise; where it cannot be set up (here: CPU tensors) every rank agrees to go without it."""
    import torch
    import torch.distributed as dist

    from pagedllm.distributed.communication import tp_all_reduce
    from pagedllm.distributed.parallel_state import ParallelState
    from pagedllm.distributed.symm_all_reduce import create_symm_all_reduce

    class Doubling:
        def fits(self, x: torch.Tensor) -> bool:
            return x.numel() <= 4

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    state = ParallelState(tp_size=2, small_all_reduce=Doubling())
    assert tp_all_reduce(torch.ones(4), state).tolist() == [2.0] * 4
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        big = torch.ones(8)
        assert tp_all_reduce(big, ParallelState(tp_size=2, tp_group=group, small_all_reduce=Doubling())) is big  # NCCL/gloo path
        assert create_symm_all_reduce(group, group, torch.float32, torch.device("cpu")) is None
    finally:
        dist.destroy_process_group()
