"""Collectives the model and the runner use, as thin wrappers over torch.distributed on the groups of
a `ParallelState` (which layers and runners keep from their construction)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pagedllm.distributed.parallel_state import ParallelState


def tp_all_reduce(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """The sum over the stage's TP ranks: in place through NCCL, or a new tensor from the small-message path."""
    small = state.small_all_reduce
    if small is not None and small.fits(x):
        return small(x)
    dist.all_reduce(x, group=state.tp_group)
    return x


def tp_gather(x: torch.Tensor, state: ParallelState, dim: int = -1) -> torch.Tensor | None:
    """Concatenates every TP rank's `x` along `dim` on the stage leader; None on the other ranks."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(state.tp_size)] if state.tp_rank == 0 else None
    dist.gather(x, parts, dst=state.stage_leader, group=state.tp_group)
    return None if parts is None else torch.cat(parts, dim=dim)


def tp_broadcast(x: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """From the stage leader to the stage's other TP ranks, in place."""
    dist.broadcast(x, src=state.stage_leader, group=state.tp_group)
    return x


def send(tensors: list[torch.Tensor], dst: int) -> None:
    for t in tensors:
        dist.send(t.contiguous(), dst)


def recv(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device, src: int) -> list[torch.Tensor]:
    out = [torch.empty(shape, dtype=dtype, device=device) for shape in shapes]
    for t in out:
        dist.recv(t, src)
    return out


def broadcast_object(state: ParallelState, obj: Any = None) -> Any:
    """The driver's `obj` on every rank of the world, over the CPU group (workers pass nothing)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=state.cpu_group)
    return box[0]


def min_over_world(state: ParallelState, value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=state.cpu_group)
    return int(t.item())
