"""The attention layer models use; the backend and this step's metadata come from the forward context.

The model runner sets the context around each forward, so model code never sees block tables,
slot mappings or which backend runs (torch on CPU, Triton on CUDA). While piecewise CUDA graphs
capture, the context also holds the point where each attention call cuts the forward. The layer
takes the fused QKV projection's output and does everything up to attention itself: the optional
per-head q/k norms, rotary embedding and the K/V write into the paged cache; on CUDA these are one
fused kernel. With a float8 KV cache, K and V are stored divided by the layer's k_scale / v_scale (floats the
loader sets from the checkpoint's `self_attn.k_scale` / `v_scale`, else 1.0), and attention multiplies them back.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from pagedllm.attention.backend import KV_FP8, AttentionBackend, AttentionMetadata
from pagedllm.attention.bidirectional import PaddedLayout, bidirectional_attention, takes_flash
from pagedllm.attention.torch_backend import write_kv
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding


class AttentionCut(Protocol):
    """Where a piecewise CUDA graph's capture cuts the forward (worker/piecewise_graph.py): the attention
    reads q from, and writes into, persistent buffers, between two captured pieces."""

    def query_buffer(self, num_tokens: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor: ...

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, scale: float, k_scale: float = 1.0,
               v_scale: float = 1.0, sliding_window: int | None = None, soft_cap: float | None = None) -> torch.Tensor: ...


@dataclass
class ForwardContext:
    backend: AttentionBackend
    meta: AttentionMetadata
    cut: AttentionCut | None = None
    token_type_ids: torch.Tensor | None = None  # encoders: each flat token's segment (cross-encoder pairs); None: 0
    padded_layout: PaddedLayout | None = None  # encoders: built by the first layer that needs it, shared by the rest
    mm_embeds: tuple[torch.Tensor, torch.Tensor] | None = None  # images: (flat rows, their embeddings) to scatter
    kv_written: Callable[[torch.Tensor], None] | None = None  # a KV producer's per-layer signal (kv_transfer/)


_context: ForwardContext | None = None


@contextmanager
def forward_context(backend: AttentionBackend, meta: AttentionMetadata, cut: AttentionCut | None = None,
                    token_type_ids: torch.Tensor | None = None,
                    mm_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
                    kv_written: Callable[[torch.Tensor], None] | None = None) -> Iterator[None]:
    global _context
    previous, _context = _context, ForwardContext(backend, meta, cut, token_type_ids, mm_embeds=mm_embeds,
                                                  kv_written=kv_written)
    try:
        yield
    finally:
        _context = previous


def current_token_type_ids() -> torch.Tensor | None:
    """The step's token-type (segment) ids, for an encoder's embeddings; None: every token is segment 0."""
    assert _context is not None, "an encoder ran outside the model runner's forward_context."
    return _context.token_type_ids


def current_mm_embeds() -> tuple[torch.Tensor, torch.Tensor] | None:
    """The step's image embeddings and the flat rows they replace (vision-language models); None: no image tokens
    (also outside a forward context: CUDA-graph replays of decodes)."""
    return None if _context is None else _context.mm_embeds


def layer_sliding_window(config: Any, layer: int) -> int | None:
    """Layer `layer`'s window as transformers reads the config: per layer from `layer_types` where the config has
    them (Gemma's interleaved local/global layers, Qwen2's max_window_layers), else `sliding_window` for every layer
    (Mistral, Phi-3); None: full attention."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer] == "sliding_attention" else None
    return window


def uniform_sliding_window(config: Any) -> int | None:
    """The window every layer shares (Mistral's), else None: then blocks outside it can go back to the pool."""
    windows = {layer_sliding_window(config, i) for i in range(config.num_hidden_layers)}
    return windows.pop() if len(windows) == 1 else None


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, rotary: RotaryEmbedding,
                 sliding_window: int | None = None, soft_cap: float | None = None) -> None:
        """sliding_window: this layer's keys are the last `sliding_window` positions (None: all); soft_cap: the
        scores' tanh cap (Gemma 2). Both go to every backend call."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.sliding_window, self.soft_cap = sliding_window, soft_cap
        self.rotary = rotary  # one cos/sin table shared by every layer
        self.kv_cache = torch.empty(0)  # bound by the model runner once the pool is allocated (bind_kv_cache)
        self.k_scale: float | None = 1.0  # a float8 KV cache's per-tensor scales (None: 1.0)
        self.v_scale: float | None = 1.0
        self._kv_scales = (1.0, 1.0)  # what the writes and reads take: the scales for a float8 cache, else 1.0

    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        """Binds this layer's slice of the pool; the scales apply from here on (so set them before) and only when
        the cache is float8: decided once here, not per step."""
        k_scale, v_scale = (1.0 if s is None else float(s) for s in (self.k_scale, self.v_scale))
        if not (k_scale > 0 and v_scale > 0):  # NaN too
            raise ValueError(f"KV cache scales must be positive, got k_scale={self.k_scale!r}, v_scale={self.v_scale!r}.")
        self.kv_cache = kv_cache
        self._kv_scales = (k_scale, v_scale) if kv_cache.dtype == KV_FP8 else (1.0, 1.0)

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, q_norm: RMSNorm | None = None,
                k_norm: RMSNorm | None = None) -> torch.Tensor:
        """qkv [T, (H + 2 Hkv) * D] -> [T, H * D]; q_norm/k_norm: per-head RMSNorms (Qwen3)."""
        assert _context is not None, "Attention ran outside the model runner's forward_context."
        backend, meta, cut = _context.backend, _context.meta, _context.cut
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        k_scale, v_scale = self._kv_scales
        if qkv.is_cuda:
            from pagedllm.kernels.rope_kv_write import rope_kv_write

            q_out = None if cut is None else cut.query_buffer(qkv.shape[0], heads, dim, qkv.dtype)
            q = rope_kv_write(qkv, positions, self.rotary.cos_sin_cache, heads, kv_heads, dim, self.kv_cache, meta.slot_mapping,
                              q_norm.weight if q_norm else None, k_norm.weight if k_norm else None, q_norm.eps if q_norm else 0.0,
                              q_out=q_out, k_scale=k_scale, v_scale=v_scale)
        else:
            q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
            q, k, v = q.view(-1, heads, dim), k.view(-1, kv_heads, dim), v.view(-1, kv_heads, dim)
            if q_norm is not None and k_norm is not None:
                q, k = q_norm(q), k_norm(k)
            q, k = self.rotary(positions, q, k)
            write_kv(k, v, self.kv_cache, meta.slot_mapping, k_scale, v_scale)
        if _context.kv_written is not None:
            _context.kv_written(self.kv_cache)
        window, cap = self.sliding_window, self.soft_cap
        if cut is not None:
            return cut.attend(q, self.kv_cache, self.scale, k_scale, v_scale, window, cap).flatten(1)
        return backend.forward(q, self.kv_cache, meta, self.scale, None, k_scale, v_scale, window, cap).flatten(1)


class EncoderAttention(nn.Module):
    """An encoder's self-attention: bidirectional within each prompt of the step, nothing cached
    (attention/bidirectional.py)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [T, (H + 2 Hkv) * D] -> [T, H * D]."""
        context = _context
        assert context is not None, "EncoderAttention ran outside the model runner's forward_context."
        heads, kv_heads, meta = self.num_heads, self.num_kv_heads, context.meta
        if context.padded_layout is None and not takes_flash(qkv, heads, kv_heads):
            context.padded_layout = PaddedLayout.build(meta.query_start_loc_cpu, qkv.device)
        return bidirectional_attention(qkv, heads, kv_heads, self.head_dim, meta, self.scale, context.padded_layout)
