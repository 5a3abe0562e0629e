"""RMSNorm, optionally fused with the residual add, with transformers' LlamaRMSNorm numerics:
normalise in fp32, round to the input dtype, then multiply by the weight (rounding again).

With a residual, the sum x + residual is first rounded to the input dtype (as the eager model's
bf16 add would) and that rounded value is both returned and normalised.

With `quant` (float8_e4m3fn or int8) the normalised rows (rounded to the input dtype as above) are written in that
type with one scale per row instead, for a quantized linear layer after the norm (quantization/fp8.py, int8.py): the
quantization costs no extra pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels import interpreting, pdl_options, pdl_prologue
from pagedllm.kernels.quant_rows import QUANT_DTYPES, quantize_row
from pagedllm.quantization.base import QuantRows


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, scale_ptr,
    stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
    HAS_RES: tl.constexpr, QUANT: tl.constexpr, EXACT: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        x = x.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=ok)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    dtype = x_ptr.dtype.element_ty
    y = (x * rstd).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if QUANT:
        quantize_row((y * w).to(dtype).to(tl.float32), ok, out_ptr + row * stride_o + cols, scale_ptr + row, EXACT)
    else:
        tl.store(out_ptr + row * stride_o + cols, (y * w).to(dtype), mask=ok)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            quant: torch.dtype | None = None) -> tuple[torch.Tensor | QuantRows, torch.Tensor]:
    """Returns (normed, x + residual); without a residual the second is a placeholder. quant: normed as QuantRows."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    res = residual.reshape(-1, n) if residual is not None else x2  # unread without HAS_RES
    assert x2.stride(-1) == 1 and res.stride(-1) == 1 and weight.is_contiguous()
    assert quant is None or quant in QUANT_DTYPES
    out = torch.empty(x2.shape, dtype=quant or x.dtype, device=x.device)
    scales = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device) if quant else out
    res_out = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if residual is not None else x2
    block = triton.next_power_of_2(n)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, res, weight, out, res_out, scales, x2.stride(0), res.stride(0), out.stride(0), res_out.stride(0), n,
            eps, HAS_RES=residual is not None, QUANT=quant is not None, EXACT=interpreting(), BLOCK=block,
            num_warps=min(16, max(1, block // 512)), **pdl_options(x.device),
        )
    normed = QuantRows(out, scales) if quant else out.view(x.shape)
    return normed, res_out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, quant: torch.dtype | None = None
             ) -> torch.Tensor | QuantRows:
    """RMSNorm over the last dim of x (as `quant` rows with their scales, x 2-D, if given)."""
    return _launch(x, None, weight, eps, quant)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, quant: torch.dtype | None = None
) -> tuple[torch.Tensor | QuantRows, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to x's dtype."""
    assert residual.shape == x.shape
    return _launch(x, residual, weight, eps, quant)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaRMSNorm in torch: returns (normed, x + residual or x)."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x
