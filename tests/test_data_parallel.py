"""Data parallelism: engine replicas in processes of their own behind one front. Concurrent requests
are spread by load and each is answered exactly once with one process's tokens; aborts reach the
replica that owns the request; a replica that dies makes the server unhealthy; `pagedllm serve
--data-parallel-size 2` serves, sums the replicas' metrics and exits cleanly."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.engine.data_parallel import DPAsyncLLM
from pagedllm.entrypoints.openai.api_server import ServerSettings, build_app
from tests.server_utils import SMALL_SERVER_ARGS, ServerProcess

TINY_ARGS = dict(skip_tokenizer_init=True, kv_cache_memory=16 << 20, max_model_len=256)


def test_front_balances_routes_and_answers_once(tiny_models: dict[str, str]) -> None:
    path = tiny_models["llama"]
    prompts = [{"prompt_token_ids": [5 + i, 6, 7 + 2 * i]} for i in range(16)]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + i, ignore_eos=True) for i in range(16)]
    expected = [o.outputs[0].token_ids for o in LLM(path, **TINY_ARGS).generate(prompts, params, use_tqdm=False)]

    async def main() -> None:
        front = DPAsyncLLM.create(EngineConfig(model=path, data_parallel_size=2, **TINY_ARGS), max_queued_samples=64)
        front.start()
        try:
            async def one(i: int) -> tuple[list[int], int]:
                tokens, finals = [], 0
                async for output in front.generate(f"r{i}", prompts[i], params[i]):
                    tokens += output.outputs[0].token_ids
                    finals += output.finished
                return tokens, finals

            results = await asyncio.gather(*(one(i) for i in range(16)))
            assert [tokens for tokens, _ in results] == expected
            assert all(finals == 1 for _, finals in results)
            assert all(r.stats.generation_tokens > 0 for r in front.replicas)  # both replicas served
            assert front.stats.generation_tokens == sum(len(t) for t in expected)

            # An abort goes to the replica that holds the request.
            stream = await front.add_request("long", {"prompt_token_ids": [9, 9]}, SamplingParams(max_tokens=200, ignore_eos=True))
            assert sum(r.has_request("long") for r in front.replicas) == 1
            with pytest.raises(ValueError, match="already in use"):
                await front.add_request("long", {"prompt_token_ids": [9]}, SamplingParams(max_tokens=2))
            await anext(stream)
            front.abort("long")
            outputs = [o async for o in stream]
            assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
            assert front.num_samples_in_flight == 0

            # A replica that dies takes the front's health with it.
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(front, ServerSettings(model_names=["tiny"]))),
                                         base_url="http://tiny") as http:
                assert (await http.get("/health")).status_code == 200
                front.cores[1].proc.kill()
                deadline = time.monotonic() + 20
                while (await http.get("/health")).status_code == 200 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert (await http.get("/health")).status_code == 503
        finally:
            await front.shutdown()
        assert not any(core.proc.is_alive() for core in front.cores)

    asyncio.run(asyncio.wait_for(main(), 180))


def test_serve_two_replicas(smollm2: str) -> None:
    prompts = [f"Fact number {i}: the {w} is" for i, w in enumerate(["sky", "sea", "sun", "moon"] * 4)]
    reference = LLM(smollm2, kv_cache_memory=256 << 20, max_model_len=256).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    server = ServerProcess([*SMALL_SERVER_ARGS, "--data-parallel-size", "2", "--served-model-name", "smol", smollm2])
    try:
        async def run_all() -> list[str]:
            client = server.async_client()
            try:
                responses = await asyncio.gather(*(
                    client.completions.create(model="smol", prompt=p, max_tokens=6, temperature=0.0, extra_body={"ignore_eos": True})
                    for p in prompts))
            finally:
                await client.close()
            return [r.choices[0].text for r in responses]

        assert asyncio.run(run_all()) == [o.outputs[0].text for o in reference]
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(httpx.get(server.url("/metrics")).text):
            for sample in family.samples:  # summed over labels (finished_reason)
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        assert totals["pagedllm:generation_tokens_total"] == 6 * len(prompts)
        assert totals["pagedllm:request_success_total"] == len(prompts)
    finally:
        assert server.stop() == 0, server.logs()
