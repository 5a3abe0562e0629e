"""The attention layer models use; the backend and this step's metadata come from the forward context.

The model runner sets the context around each forward, so model code never sees block tables,
slot mappings or which backend runs (torch on CPU, Triton on CUDA).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata


@dataclass
class ForwardContext:
    backend: AttentionBackend
    meta: AttentionMetadata


_context: ForwardContext | None = None


@contextmanager
def forward_context(backend: AttentionBackend, meta: AttentionMetadata) -> Iterator[None]:
    global _context
    previous, _context = _context, ForwardContext(backend, meta)
    try:
        yield
    finally:
        _context = previous


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.kv_cache = torch.empty(0)  # bound by the model runner once the pool is allocated

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""
        assert _context is not None, "Attention ran outside the model runner's forward_context."
        backend, meta = _context.backend, _context.meta
        backend.write_kv(k, v, self.kv_cache, meta.slot_mapping)
        return backend.forward(q, self.kv_cache, meta, self.scale)
