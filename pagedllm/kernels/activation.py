"""SiLU-and-mul for the fused gate/up projection: [T, 2I] (gate, then up) -> silu(gate) * up; and GeGLU (Gemma):
gelu_tanh(gate) * up, a compile-time variant of the same kernels.

The activation is computed in fp32 and rounded to the input dtype before the product, as eager
`F.silu(gate) * up` does in bf16, so the result matches transformers' MLP.

`silu_and_mul(x, quant=dtype)` writes the (rounded) products as float8 or int8 rows with one scale per row instead,
for a quantized down projection: one program per row, a first pass over it for its amax, a second (re-reading from
L2) to store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels import interpreting, pdl_options, pdl_prologue
from pagedllm.kernels.quant_rows import QUANT_DTYPES, quantize_value, row_scale
from pagedllm.quantization.base import QuantRows


@triton.jit
def _act_mul(x_row, cols, inter, ok, GELU: tl.constexpr):
    """act(gate) * up at `cols` of one row, in float32, each step rounded to the row's dtype as eager torch. GELU:
    the tanh approximation, tanh(y) written as 1 - 2 / (1 + exp(2y))."""
    dtype = x_row.dtype.element_ty
    g = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(x_row + inter + cols, mask=ok, other=0.0).to(tl.float32)
    if GELU:
        y = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = 0.5 * g * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * y)))
    else:
        act = g / (1.0 + tl.exp(-g))
    return (act.to(dtype).to(tl.float32) * u).to(dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
                         GELU: tl.constexpr = False):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    tl.store(out_ptr + row * stride_o + cols, _act_mul(x_ptr + row * stride_x, cols, inter, ok, GELU), mask=ok)


@triton.jit
def _silu_and_mul_quant_kernel(x_ptr, q_ptr, s_ptr, stride_x, stride_q, inter, BLOCK: tl.constexpr,
                               EXACT: tl.constexpr, USE_PDL: tl.constexpr, GELU: tl.constexpr = False):
    pdl_prologue(USE_PDL)
    INT8: tl.constexpr = q_ptr.dtype.element_ty == tl.int8
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], tl.float32)
    for start in range(0, inter, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(_act_mul(x_row, cols, inter, cols < inter, GELU).to(tl.float32)))
    scale = row_scale(tl.max(amax, 0), INT8)
    tl.store(s_ptr + row, scale)
    for start in range(0, inter, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < inter
        q = quantize_value(_act_mul(x_row, cols, inter, ok, GELU).to(tl.float32), scale, INT8, EXACT)
        tl.store(q_ptr + row * stride_q + cols, q, mask=ok)


def silu_and_mul(x: torch.Tensor, quant: torch.dtype | None = None, gelu: bool = False) -> torch.Tensor | QuantRows:
    """silu(gate) * up over x's last dim (gelu_tanh(gate) * up with `gelu`), as `quant` rows with their scales,
    flattened to 2-D, if given."""
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inter)
    assert x2.stride(-1) == 1
    rows = x2.shape[0]
    assert quant is None or quant in QUANT_DTYPES
    out = torch.empty(rows, inter, dtype=quant or x.dtype, device=x.device)
    if quant:
        scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
        block = min(2048, triton.next_power_of_2(inter))
        if rows:
            _silu_and_mul_quant_kernel[(rows,)](x2, out, scales, x2.stride(0), out.stride(0), inter, BLOCK=block,
                                                EXACT=interpreting(), GELU=gelu, num_warps=8, **pdl_options(x.device))
        return QuantRows(out, scales)
    block = min(1024, triton.next_power_of_2(inter))
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
            x2, out, x2.stride(0), out.stride(0), inter, BLOCK=block, GELU=gelu, num_warps=4, **pdl_options(x.device)
        )
    return out.view(*x.shape[:-1], inter)


def silu_and_mul_ref(x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    act = torch.nn.functional.gelu(gate, approximate="tanh") if gelu else torch.nn.functional.silu(gate)
    return act * up
