"""W8A8 int8 (compressed-tensors' `int-quantized`, as llm-compressor's W8A8 recipes write it): int8 weights with one
scale per output row (or per tensor), activations quantized to int8 per token on the fly (or with a static per-tensor
scale), products summed exactly in int32 and scaled per row and per token after. Loading and the weights' scales are the FP8
method's, with int8 in place of float8, and so is the GPU path: rows quantized in one kernel pass or by the RMSNorm /
SiLU-and-mul before (QuantRows), the Triton scaled GEMM (int8 dots, the scaling in its epilogue), and for up to 16
rows the int8-weight GEMV (W8A16). Elsewhere `torch._int_mm` with the scaling after (the reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.quantization.base import QuantRows
from pagedllm.quantization.fp8 import Fp8LinearMethod

INT8_MAX = 127


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).round().clamp(-INT8_MAX - 1, INT8_MAX).to(torch.int8)


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic scales [M, 1] = amax(row) / 127 (an all-zero row keeps a positive scale) and the codes."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / INT8_MAX).clamp(min=1e-10)
    return quantize_int8(x, scale), scale


class Int8LinearMethod(Fp8LinearMethod):
    name = "int8"
    weight_dtype = torch.int8

    def __init__(self, weights: str = "channel", activations: str = "token", serialized: bool = False,
                 ignore: list[str] | None = None) -> None:
        if weights not in ("channel", "tensor") or activations not in ("token", "static"):
            raise ValueError(f"int8: unsupported weight strategy {weights!r} / activation scheme {activations!r} "
                             "(channel or tensor weights; dynamic per-token or static per-tensor activations).")
        super().__init__(weights, activations, serialized, ignore=ignore)

    def quantize_per_channel(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_per_token_int8(weight)

    def _gpu_gemm_applies(self, layer: nn.Module) -> str | None:
        return "rows" if layer.weight.is_cuda and layer.orig_dtype in (torch.bfloat16, torch.float16) else None

    def rows_product(self, layer: nn.Module, xq: torch.Tensor, sx: torch.Tensor, bias: torch.Tensor | None,
                     out_dtype: torch.dtype) -> torch.Tensor:
        from pagedllm.kernels.scaled_gemm import scaled_gemm

        return scaled_gemm(xq, sx, layer.weight, layer.weight_scale_row, bias, out_dtype)

    def quantize_input(self, layer: nn.Module, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.activations == "static":
            scale = layer.input_scale.reshape(1, 1)
            return quantize_int8(x2, scale), scale.expand(x2.shape[0], 1).contiguous()
        from pagedllm.kernels.quant_rows import quantize_rows

        return quantize_rows(x2, torch.int8)

    def apply(self, layer: nn.Module, x: torch.Tensor | QuantRows, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, QuantRows) or layer.fp8_gemm:
            return super().apply(layer, x, bias)
        x2 = x.reshape(-1, x.shape[-1])
        if self.activations == "static":
            scale = layer.input_scale.reshape(1, 1)
            xq, sx = quantize_int8(x2, scale), scale.expand(x2.shape[0], 1)
        else:
            xq, sx = quantize_per_token_int8(x2)
        rows = xq.shape[0]
        if xq.is_cuda and rows <= 16:  # cuBLASLt's int8 product wants more than 16 rows
            xq = F.pad(xq, (0, 0, 0, 32 - rows))
        acc = torch._int_mm(xq, layer.weight.t())[:rows]
        out = (acc.float() * sx * layer.weight_scale.reshape(1, -1)).to(x.dtype)
        if bias is not None:
            out += bias
        return out.view(*x.shape[:-1], out.shape[-1])
