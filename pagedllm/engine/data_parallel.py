"""Data parallelism: K engine replicas behind one AsyncLLM-shaped front, for the server.

Each replica is an engine core in its own process (`core.py`) with its own KV cache and its
own tensor x pipeline world, behind its own AsyncLLM; the front only routes. A new request goes to
the replica with the least load: its samples running or waiting, counted as they are added and as
they finish, so a burst spreads at once rather than a step later. A request's stream, its abort and
a beam search's sub-requests stay with the replica that holds it. Metrics see the replicas' summed stats.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any, Iterable, Sequence

import torch

from pagedllm.config import EngineConfig
from pagedllm.engine.async_engine import AsyncLLM, RequestStream, StepHook
from pagedllm.engine.core_client import EngineCoreClient
from pagedllm.engine.llm_engine import EngineStats, PromptType, load_tokenizer
from pagedllm.beam_search import BeamSearchOutput
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import BeamSearchParams, SamplingParams
from pagedllm.spec_decode.decoder import SpecDecodeStats


class DPAsyncLLM:
    def __init__(self, replicas: list[AsyncLLM]) -> None:
        self.replicas = replicas
        self.cores = [r.core for r in replicas]
        first = replicas[0]
        self.tokenizer, self.config, self.vocab_size = first.tokenizer, first.config, first.vocab_size

    @classmethod
    def create(cls, config: EngineConfig, max_queued_samples: int | None = None, on_step: StepHook | None = None) -> DPAsyncLLM:
        """Starts `config.data_parallel_size` engine cores, which load at once; `max_queued_samples` bounds each."""
        config.finalize()
        tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config)
        replica = dataclasses.replace(config, data_parallel_size=1)
        cores = [EngineCoreClient(replica, i, tokenizer, env) for i, env in enumerate(_replica_envs(config))]
        try:
            for core in cores:
                core.wait_ready()
        except BaseException:
            for core in cores:
                core.shutdown()
            raise
        front = cls([AsyncLLM(core, max_queued_samples) for core in cores])
        if on_step is not None:
            def record(_: EngineStats, outputs: list[RequestOutput], now: float) -> None:
                on_step(front.stats, outputs, now)

            for r in front.replicas:
                r.on_step = record
        return front

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        for r in self.replicas:
            r.start()

    @property
    def is_running(self) -> bool:
        return all(r.is_running for r in self.replicas)

    @property
    def error(self) -> BaseException | None:
        return next((r.error for r in self.replicas if r.error is not None), None)

    async def shutdown(self) -> None:
        await asyncio.gather(*(r.shutdown() for r in self.replicas))

    @property
    def stats(self) -> EngineStats:
        """The replicas' latest stats, summed (KV cache usage averaged)."""
        each = [r.stats for r in self.replicas]
        merged = {"spec_decode", "running_loras", "waiting_loras"}
        total: dict = {f.name: sum(getattr(s, f.name) for s in each) for f in dataclasses.fields(EngineStats)
                       if f.name not in merged}
        total["kv_cache_usage"] /= len(each)
        total["spec_decode"] = SpecDecodeStats.total([s.spec_decode for s in each if s.spec_decode is not None])
        for name in ("running_loras", "waiting_loras"):
            total[name] = tuple(sorted({lora for s in each for lora in getattr(s, name)}))
        return EngineStats(**total)

    @property
    def num_samples_in_flight(self) -> int:
        return sum(r.num_samples_in_flight for r in self.replicas)

    # ---- requests -------------------------------------------------------------------------
    def _least_loaded(self) -> AsyncLLM:
        return min(self.replicas, key=lambda r: r.num_samples_in_flight)

    async def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams,
        arrival_time: float | None = None, stream: RequestStream | None = None, lora_request: Any = None,
        priority: int = 0,
    ) -> RequestStream:
        """AsyncLLM.add_request on the least-loaded replica."""
        if any(r.has_request(request_id) for r in self.replicas):
            raise ValueError(f"request_id {request_id!r} is already in use.")
        return await self._least_loaded().add_request(request_id, prompt, params, arrival_time, stream, lora_request,
                                                      priority)

    async def add_lora(self, lora_request: Any) -> bool:
        return all(await asyncio.gather(*(r.add_lora(lora_request) for r in self.replicas)))

    async def remove_lora(self, lora_int_id: int) -> bool:
        return any(await asyncio.gather(*(r.remove_lora(lora_int_id) for r in self.replicas)))

    generate = AsyncLLM.generate  # through this class's add_request and abort

    async def beam_search(self, prompts: Sequence[PromptType], params: BeamSearchParams, request_id: str) -> list[BeamSearchOutput]:
        return await self._least_loaded().beam_search(prompts, params, request_id)

    def abort(self, request_ids: str | Iterable[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for r in self.replicas:
            mine = [i for i in ids if r.has_request(i)]
            if mine:
                r.abort(mine)

    def abort_all(self) -> None:
        for r in self.replicas:
            r.abort_all()

    async def reset_prefix_cache(self) -> bool:
        return all(await asyncio.gather(*(r.reset_prefix_cache() for r in self.replicas)))


def _replica_envs(config: EngineConfig) -> list[dict[str, str]]:
    """Each replica's environment: on CUDA its own block of world_size GPUs; on CPU its share of the threads."""
    k, world = config.data_parallel_size, config.world_size
    if not config.device.startswith("cuda"):
        return [{"OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // k))}] * k
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if k * world > len(devices):
        raise ValueError(f"data_parallel_size={k} x {world} GPUs per replica needs {k * world} GPUs; {len(devices)} visible.")
    return [{"CUDA_VISIBLE_DEVICES": ",".join(devices[i * world : (i + 1) * world])} for i in range(k)]
