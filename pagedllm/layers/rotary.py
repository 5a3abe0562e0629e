"""Rotary position embedding (rotate-half style), with a cos/sin table indexed by position.

The table is computed like transformers computes it (inv_freq in float32, positions * inv_freq,
cos/sin, scaled by the rope type's attention factor), so the rotated q/k match bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _inv_freq(config: Any, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """layer_type: the key of this layer kind's parameters in a per-layer-type `rope_parameters` (Gemma 3's local
    and global layers differ in base and scaling)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None:
        params = dict(params[layer_type])
    if not params:  # configs written before transformers 5
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("default", "mrope"):  # M-RoPE (Qwen2-VL): default frequencies, split over three position axes
        base = params["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"Unsupported rope type {rope_type!r}.")
    extra = {} if layer_type is None else {"layer_type": layer_type}
    return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), **extra)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: Any, head_dim: int, max_position: int, layer_type: str | None = None) -> None:
        super().__init__()
        self.config, self.head_dim, self.max_position, self.layer_type = config, head_dim, max_position, layer_type
        self.register_buffer("cos_sin_cache", self.build_cache().to(torch.get_default_device()), persistent=False)

    def build_cache(self) -> torch.Tensor:
        """[max_position, head_dim] float32, on the CPU (also while a model is built on the meta device):
        cos in the first half of each row, sin in the second."""
        with torch.device("cpu"):
            inv_freq, scaling = _inv_freq(self.config, self.head_dim, self.layer_type)
            freqs = torch.arange(self.max_position, dtype=torch.float)[:, None] * inv_freq[None, :]
            return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], -1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D], k [T, Hkv, D] (the torch path; on CUDA the attention layer's fused kernel rotates)."""
        cos, sin = self.cos_sin_cache[positions].to(q.dtype)[:, None, :].chunk(2, dim=-1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
