"""LoRA on the model's linear layers: each wrapped layer keeps, per adapter slot, the A rows of every part it fuses
(q/k/v, gate/up) stacked [parts * R, in] and their B columns laid out so that part i's output rows read only its own R
columns ([out, parts * R], zeros elsewhere): one shrink x @ A.T and one expand @ B.T give every part's delta. A part
the adapter does not target stays zero. Under tensor parallelism B takes this rank's output rows (column-parallel) and
A this rank's input columns (row-parallel: each rank's partial delta is summed by the layer's all-reduce).

Each step's flat tokens carry the slot of their request's adapter (`LoRABatch.token_slots`, -1: the base model). On
CUDA the delta is one shrink and one expand over the tokens grouped by slot (kernels/lora.py), or, in a decode CUDA
graph, row-indexed by the slots in the graph's persistent buffer (no segments: nothing from the host); elsewhere the
per-slot torch loop those kernels are tested against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagedllm.quantization.base import input_columns, row_shards


@dataclass
class LoRAPlan:
    """What every rank needs of a step's adapters (the driver broadcasts it under tensor parallelism)."""

    adapters: dict[int, Any]  # slot -> LoRARequest
    token_slots: Any  # np.ndarray [tokens] int64, -1: the base model
    decode_only: bool = False  # one token per row: the row-indexed kernel, with nothing grouped on the host


@dataclass
class LoRABatch:
    token_slots: torch.Tensor  # [tokens] int64: each flat token's adapter slot, -1 for the base model
    segments: Any = None  # kernels.lora.LoRASegments on CUDA eagerly; None in a CUDA graph (row-indexed)


_batch: LoRABatch | None = None  # the step being run; None: no adapter in it


def current_lora_batch() -> LoRABatch | None:
    return _batch


@contextlib.contextmanager
def lora_context(batch: LoRABatch | None) -> Iterator[None]:
    global _batch
    previous, _batch = _batch, batch
    try:
        yield
    finally:
        _batch = previous


def lora_delta_ref(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                   token_slots: torch.Tensor) -> torch.Tensor:
    """The same per-adapter loop in torch (float64 for the tests' reference, or the CPU path's dtype)."""
    for slot in torch.unique(token_slots[token_slots >= 0]).tolist():
        rows = (token_slots == slot).nonzero().squeeze(1)
        xs = x.index_select(0, rows).to(a.dtype)
        out.index_add_(0, rows, ((xs @ a[slot].T) @ b[slot].T).to(out.dtype))
    return out


class LoRASlots:
    def __init__(self, layer: nn.Module, parts: list[str], max_loras: int, max_rank: int) -> None:
        weight = layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
        self.layer, self.parts, self.rank = layer, parts, max_rank
        width = len(parts) * max_rank
        self.a = torch.zeros(max_loras, width, layer.in_features, dtype=dtype, device=weight.device)
        self.b = torch.zeros(max_loras, layer.out_features, width, dtype=dtype, device=weight.device)

    def load(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Slot `slot` takes an adapter's tensors for this layer's parts (zeros for the parts it lacks)."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        shards = row_shards(self.layer)
        _, k_start, k_size = input_columns(self.layer)
        offset = 0
        for i, (name, (_, start, size)) in enumerate(zip(self.parts, shards)):
            if name in weights:
                a, b = weights[name]
                r, lo = a.shape[0], i * self.rank
                self.a[slot, lo : lo + r] = a[:, k_start : k_start + k_size].to(self.a.dtype)
                self.b[slot, offset : offset + size, lo : lo + r] = b[start : start + size].to(self.b.dtype)
            offset += size

    def add_delta(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        batch = _batch
        if batch is None or x.dim() != 2 or x.shape[0] != batch.token_slots.shape[0]:
            return out
        if x.is_cuda:
            from pagedllm.kernels.lora import lora_delta

            return lora_delta(x, self.a, self.b, out, batch.segments, batch.token_slots)
        return lora_delta_ref(x, self.a, self.b, out, batch.token_slots)


def wrap(layer: nn.Module, slots: LoRASlots) -> None:
    """The layer's product (its quantization method's, if any) plus the LoRA delta of each token's adapter."""
    base = layer.product

    def product(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return slots.add_delta(x, base(x, bias))

    layer.product = product
    layer.lora = slots
