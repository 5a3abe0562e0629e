"""RMSNorm with the numerics of transformers' LlamaRMSNorm (normalise in float32, scale in the model dtype).

Given a residual, it first adds it (x + residual, exactly the sum transformers computes) and
returns the sum as the new residual: on CUDA both happen in one fused kernel.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda:  # any rank: the kernel normalises rows of the last dim (per-head q/k norms too)
            from pagedllm.kernels.norm import fused_add_rms_norm, rms_norm

            return rms_norm(x, self.weight, self.eps) if residual is None else fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
