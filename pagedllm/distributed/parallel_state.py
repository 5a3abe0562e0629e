"""The process groups of one engine's tensor x pipeline world, and this process's place in it.

A runner keeps its `ParallelState` and builds its model inside `building(state)`, where layers read
it (`get_parallel_state`) and keep it for their collectives; outside, the state is the single-process
one, so a one-process engine built beside a parallel one in the same process stays single.

Ranks are laid out stage-major: rank = pp_rank * tp_size + tp_rank, so each pipeline stage is
a block of tp_size consecutive ranks with its own TP group. Rank 0, the driver, lives in the
engine process: it schedules, broadcasts each step's plan over the CPU group and samples.

Two kinds of group: device collectives (NCCL on CUDA, gloo on CPU) for activations, and one
gloo group over the whole world for the step plan, whose timeout is effectively infinite because
workers wait there while the engine is idle. A peer that dies closes its sockets, so gloo ops
fail at once rather than time out; the executors' watchdogs cover the rest.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_IDLE_TIMEOUT = datetime.timedelta(days=365)  # workers wait on the step plan for as long as the engine idles
_STORE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    tp_size: int = 1
    pp_size: int = 1
    tp_group: Any = None  # device collectives within this rank's pipeline stage
    cpu_group: Any = None  # gloo over the whole world: the step plan and start-up agreements
    small_all_reduce: Any = None  # a SymmAllReduce for the TP group's small all-reduces (CUDA), or None: NCCL

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def stage_leader(self) -> int:
        """The global rank of tp rank 0 in this stage (where the stage's gathers land)."""
        return self.pp_rank * self.tp_size


_state = ParallelState()


def get_parallel_state() -> ParallelState:
    """The state of the model being built (the single-process one outside `building`)."""
    return _state


@contextmanager
def building(state: ParallelState) -> Iterator[None]:
    global _state
    previous, _state = _state, state
    try:
        yield
    finally:
        _state = previous


def create_store(world_size: int) -> dist.TCPStore:
    """The driver's rendezvous store, on a port the OS picks; workers connect to it by host and `store.port`."""
    return dist.TCPStore("0.0.0.0", 0, world_size, is_master=True, timeout=_STORE_TIMEOUT, wait_for_workers=False)


def connect_store(host: str, port: int, world_size: int) -> dist.TCPStore:
    return dist.TCPStore(host, port, world_size, is_master=False, timeout=_STORE_TIMEOUT)


def wait_for_workers(store: dist.TCPStore, world_size: int, check_alive: Callable[[], None]) -> None:
    """Blocks until every worker has connected, calling `check_alive` (which raises if one died) meanwhile,
    so a worker that fails while starting ends the wait instead of leaving the driver in a rendezvous."""
    keys = [f"ready/{rank}" for rank in range(1, world_size)]
    while not store.check(keys):
        check_alive()
        time.sleep(0.05)


def init_distributed(
    store: dist.TCPStore, rank: int, tp_size: int, pp_size: int, device: torch.device, symm_dtype: torch.dtype | None = None,
) -> ParallelState:
    """Joins this process to the world and builds its groups (every rank creates every group, in the same order).
    With `symm_dtype`, on CUDA under TP, small all-reduces of that dtype go through symmetric memory."""
    if dist.is_initialized():
        raise RuntimeError("This process already runs a tensor/pipeline-parallel engine: shut it down first (engine.shutdown()).")
    world_size = tp_size * pp_size
    if rank > 0:
        store.set(f"ready/{rank}", "1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    tp_group = None
    for stage in range(pp_size):
        group = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)))
        if stage == rank // tp_size:
            tp_group = group
    cpu_group = dist.new_group(list(range(world_size)), backend="gloo", timeout=_IDLE_TIMEOUT)
    small = None
    if symm_dtype is not None and tp_size > 1 and device.type == "cuda":
        from pagedllm.distributed.symm_all_reduce import create_symm_all_reduce

        small = create_symm_all_reduce(tp_group, cpu_group, symm_dtype, device)
    return ParallelState(rank, tp_size, pp_size, tp_group, cpu_group, small)


def destroy_distributed(timeout_s: float = 30.0) -> None:
    """Leaves the world. Bounded: a teardown that hangs (an NCCL peer gone, pytorch/pytorch#115388) must
    not keep a shutting-down process alive."""
    if not dist.is_initialized():
        return
    done = threading.Thread(target=dist.destroy_process_group, name="pagedllm-destroy-pg", daemon=True)
    done.start()
    done.join(timeout_s)
    if done.is_alive():
        logger.warning("torch.distributed teardown did not finish in %.0f s; leaving it", timeout_s)
