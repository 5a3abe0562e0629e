"""The entry point of every rank but the driver (a spawned process or a Ray actor): join the engine's
world, build this rank's runner (its model shard and KV cache), then follow the driver's steps."""

from __future__ import annotations

import torch

from pagedllm.config import EngineConfig
from pagedllm.distributed.parallel_state import connect_store, destroy_distributed, init_distributed


def share_cpu_threads(world_size: int) -> None:
    """On CPU the ranks of one machine split its cores, or their matmuls would fight over them."""
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))


def run_worker(config: EngineConfig, rank: int, host: str, port: int) -> None:
    from pagedllm.worker.model_runner import ModelRunner

    device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())  # Ray actors see only their own GPU
    else:
        share_cpu_threads(config.world_size)
    store = connect_store(host, port, config.world_size)
    state = init_distributed(store, rank, config.tensor_parallel_size, config.pipeline_parallel_size, device, config.symm_all_reduce_dtype)
    try:
        runner = ModelRunner(config, state)
        try:
            runner.follow()
        finally:
            runner.release_cuda_graphs()  # before the process group goes
    finally:
        destroy_distributed()
