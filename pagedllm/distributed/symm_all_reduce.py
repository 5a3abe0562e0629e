"""Small tensor-parallel all-reduces through symmetric memory, for the latency-bound decode steps.

NCCL spends about 20 us (2 H200s) to 32 us (4) on an all-reduce of a few KB, even inside a CUDA graph,
and a TP step does two per layer: 3 to 5 ms of a 70B decode step (benchmarks/allreduce_bench.py). A
one-shot reduction over NVLink peer memory instead: every rank copies its input into a buffer all ranks
of the group have mapped (torch's symmetric memory), a barrier, then each sums every rank's copy
itself. Messages larger than the buffer stay with NCCL, whose ring wins on bandwidth.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

MAX_BYTES = 4 << 20  # a 512-token decode batch of an 8B model in bf16; a 256-token one of a 70B


class SymmAllReduce:
    def __init__(self, group: Any, dtype: torch.dtype, device: torch.device, max_bytes: int = MAX_BYTES) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        if device.index is None:  # the driver's plain "cuda": the device it runs on
            device = torch.device("cuda", torch.cuda.current_device())
        self.group_name: str = group.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == self.buffer.dtype and x.numel() <= self.buffer.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        return torch.ops.symm_mem.one_shot_all_reduce_copy(self.buffer[:n], x.reshape(-1), "sum", self.group_name).view(x.shape)


def create_symm_all_reduce(group: Any, cpu_group: Any, dtype: torch.dtype, device: torch.device) -> SymmAllReduce | None:
    """On CUDA with NVLink peers: the one-shot path for `group`, or None (NCCL for everything) if any rank
    of the world could not set it up, so that every rank takes the same path for every message."""
    reducer, error = None, None
    try:
        reducer = SymmAllReduce(group, dtype, device)
    except Exception as exc:  # noqa: BLE001 - no peer access, an old torch, ...: NCCL serves every size
        error = exc
    ok = torch.tensor([0 if reducer is None else 1], dtype=torch.int64)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=cpu_group)
    if int(ok.item()) == 0:
        logger.warning("symmetric-memory all-reduce unavailable (%s); NCCL serves every all-reduce", error or "on another rank")
        return None
    return reducer
