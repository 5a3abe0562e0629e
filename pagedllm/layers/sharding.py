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


class RowRange:
    """Rows [start, start + rows) of a safetensors slice, itself sliceable like one: one part of a tensor the
    checkpoint stores fused (Phi-3's qkv_proj), so that a rank still reads only its own rows of that part."""

    def __init__(self, weight: Weight, start: int, rows: int) -> None:
        self.weight, self.start, self.rows = weight, start, rows

    def get_shape(self) -> list[int]:
        return [self.rows, *self.weight.get_shape()[1:]]

    def get_dtype(self) -> str:
        return self.weight.get_dtype()

    def __getitem__(self, key: Any) -> torch.Tensor:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if rows is Ellipsis:
            rows, rest = slice(None), (Ellipsis,)
        begin, end, step = rows.indices(self.rows)
        assert step == 1, "row ranges are read in contiguous slices"
        return self.weight[(slice(self.start + begin, self.start + end), *rest)]


def row_range(weight: Weight, start: int, rows: int) -> Weight:
    """Rows [start, start + rows) of a checkpoint tensor, without reading them yet."""
    return weight.narrow(0, start, rows) if isinstance(weight, torch.Tensor) else RowRange(weight, start, rows)
