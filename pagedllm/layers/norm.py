"""RMSNorm with the numerics of transformers' LlamaRMSNorm (normalise in float32, scale in the model dtype).

Given a residual, it first adds it (x + residual, exactly the sum transformers computes) and
returns the sum as the new residual: on CUDA both happen in one fused kernel.

`quant_rows` (a dtype, set by the FP8 / W8A8 methods where such a linear layer alone reads the output): on CUDA the
kernel also quantizes the normalised rows per token, handing the layer QuantRows, where its GEMM (not its GEMV) runs.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.quantization.base import QuantRows, rows_quantization


class RMSNorm(nn.Module):
    quant_rows: torch.dtype | None = None

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | QuantRows | tuple[torch.Tensor | QuantRows, torch.Tensor]:
        if x.is_cuda:  # any rank: the kernel normalises rows of the last dim (per-head q/k norms too)
            from pagedllm.kernels.norm import fused_add_rms_norm, rms_norm

            quant = rows_quantization(self.quant_rows, x)
            if residual is None:
                return rms_norm(x, self.weight, self.eps, quant)
            return fused_add_rms_norm(x, residual, self.weight, self.eps, quant)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
