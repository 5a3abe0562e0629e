"""LoRA on the model's linear layers: each wrapped layer keeps, per adapter slot, the A rows of every part it fuses
(q/k/v, gate/up) stacked [parts * R, in] and their B columns laid out so that part i's output rows read only its own R
columns ([out, parts * R], zeros elsewhere): one shrink x @ A.T and one expand @ B.T give every part's delta. A part
the adapter does not target stays zero. Under tensor parallelism B takes this rank's output rows (column-parallel) and
A this rank's input columns (row-parallel: each rank's partial delta is summed by the layer's all-reduce).

Each step's flat tokens carry the slot of their request's adapter (`token_slots`, -1: the base model); the delta is
computed for the rows of each slot present (a torch loop: the reference the Triton kernels will be held to).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from pagedllm.quantization.base import input_columns, row_shards

_token_slots: torch.Tensor | None = None  # [tokens] int64 of the step being run; None: no adapter in it


@contextlib.contextmanager
def lora_context(token_slots: torch.Tensor | None) -> Iterator[None]:
    global _token_slots
    previous, _token_slots = _token_slots, token_slots
    try:
        yield
    finally:
        _token_slots = previous


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
        slots = _token_slots
        if slots is None or x.dim() != 2 or x.shape[0] != slots.shape[0]:
            return out
        for slot in torch.unique(slots[slots >= 0]).tolist():
            rows = (slots == slot).nonzero().squeeze(1)
            xs = x.index_select(0, rows).to(self.a.dtype)
            out.index_add_(0, rows, ((xs @ self.a[slot].T) @ self.b[slot].T).to(out.dtype))
        return out


def wrap(layer: nn.Module, slots: LoRASlots) -> None:
    """The layer's product (its quantization method's, if any) plus the LoRA delta of each token's adapter."""
    base = layer.product

    def product(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return slots.add_delta(x, base(x, bias))

    layer.product = product
    layer.lora = slots
