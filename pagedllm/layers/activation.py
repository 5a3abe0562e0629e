"""SiLU(gate) * up (Llama) and GELU(gate) * up (Gemma's GeGLU) over a fused [.., 2 * intermediate] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.quantization.base import QuantRows, rows_quantization


class SiluAndMul(nn.Module):
    quant_rows: torch.dtype | None = None  # set by the FP8 / W8A8 methods: as RMSNorm's

    def forward(self, x: torch.Tensor) -> torch.Tensor | QuantRows:
        if x.is_cuda:
            from pagedllm.kernels.activation import silu_and_mul

            return silu_and_mul(x, rows_quantization(self.quant_rows, x))
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """GeGLU with the tanh approximation of GELU (transformers' gelu_pytorch_tanh); on CUDA the SiLU kernel's variant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from pagedllm.kernels.activation import silu_and_mul

            return silu_and_mul(x, gelu=True)  # type: ignore[return-value]
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
