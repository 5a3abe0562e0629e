"""Reading one rank's slice of a checkpoint tensor. The source is a torch tensor (random "dummy"
weights) or a safetensors slice, which reads only the slice's bytes from disk, so each rank loads
just its shard."""

from __future__ import annotations

from typing import Any

import torch

Weight = Any  # torch.Tensor | safetensors' PySafeSlice


def weight_shape(weight: Weight) -> tuple[int, ...]:
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) else tuple(weight.get_shape())


def narrow(weight: Weight, dim: int, start: int, size: int) -> torch.Tensor:
    """weight[start : start + size] along dim 0 or 1."""
    if isinstance(weight, torch.Tensor):
        return weight.narrow(dim, start, size)
    return weight[start : start + size] if dim == 0 else weight[:, start : start + size]


def read_whole(weight: Weight) -> torch.Tensor:
    """The whole checkpoint tensor; safetensors slices of 0-dim tensors (scales) take `[...]`."""
    if isinstance(weight, torch.Tensor):
        return weight
    return weight[...] if not weight.get_shape() else weight[:]


def load_whole(param: torch.Tensor, weight: Weight, name: str) -> None:
    """The default loader: a replicated parameter takes the whole checkpoint tensor."""
    if weight_shape(weight) != tuple(param.shape):
        raise ValueError(f"Shape mismatch for {name}: checkpoint {weight_shape(weight)}, model {tuple(param.shape)}.")
    param.data.copy_(read_whole(weight))
