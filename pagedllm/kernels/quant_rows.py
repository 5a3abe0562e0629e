"""Dynamic quantization of activation rows in one pass, to float8 (e4m3) or int8: per token (one scale per row,
what row-wise scaled GEMMs take) or per token and GROUP columns (fp8 block-scaled weights' activations).

The math is the torch references' (quantization/fp8_utils.py, quantization/int8.py): fp8 scale = max(amax / 448,
1e-12), q = fp8(clamp(x / scale, +-448)); int8 scale = max(amax / 127, 1e-10), q = clamp(round(x / scale), -128, 127),
with IEEE division and round-half-to-even, so results are bit-identical to them. `quantize_row` is shared with the
RMSNorm and SiLU-and-mul kernels that quantize their own output (no pass over the 16-bit rows); the q pointer's
element type picks the format.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels import interpreting, pdl_options, pdl_prologue, to_fp8

QUANT_DTYPES = (torch.float8_e4m3fn, torch.int8)


@triton.jit
def row_scale(amax, INT8: tl.constexpr):
    if INT8:
        scale = tl.maximum(tl.math.div_rn(amax, 127.0), 1e-10)
    else:
        scale = tl.maximum(tl.math.div_rn(amax, 448.0), 1e-12)
    return scale


@triton.jit
def quantize_value(x, scale, INT8: tl.constexpr, EXACT: tl.constexpr):
    v = tl.math.div_rn(x, scale)
    if INT8:  # |v| <= 127: adding and removing 1.5 * 2**23 rounds it to an integer, half to even
        q = tl.clamp((v + 12582912.0) - 12582912.0, -128.0, 127.0).to(tl.int8)
    else:  # (a return in a constexpr branch does not end the function's code: one return, at the end)
        q = to_fp8(tl.clamp(v, -448.0, 448.0), EXACT)
    return q


@triton.jit
def quantize_row(x, ok, q_ptrs, scale_ptr, EXACT: tl.constexpr):
    """A whole row x (float32, masked by `ok`) in registers: stores its scale and its values in q_ptrs' type."""
    INT8: tl.constexpr = q_ptrs.dtype.element_ty == tl.int8
    scale = row_scale(tl.max(tl.where(ok, tl.abs(x), 0.0), 0), INT8)
    tl.store(scale_ptr, scale)
    tl.store(q_ptrs, quantize_value(x, scale, INT8, EXACT), mask=ok)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, stride_x, stride_q, stride_s, n_cols,
                          GROUP: tl.constexpr, BLOCK: tl.constexpr, EXACT: tl.constexpr, USE_PDL: tl.constexpr):
    """GROUP > 0: program (row, group), one scale per GROUP columns. GROUP == 0: program (row, 0), one scale per
    row, found by a first pass over the row in BLOCK columns; the second pass re-reads them (from L1/L2)."""
    pdl_prologue(USE_PDL)
    INT8: tl.constexpr = q_ptr.dtype.element_ty == tl.int8
    row = tl.program_id(0).to(tl.int64)
    x_row, q_row = x_ptr + row * stride_x, q_ptr + row * stride_q
    if GROUP > 0:
        cols = tl.program_id(1) * GROUP + tl.arange(0, GROUP)
        ok = cols < n_cols
        x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        quantize_row(x, ok, q_row + cols, s_ptr + row * stride_s + tl.program_id(1), EXACT)
    else:
        amax = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)))
        scale = row_scale(tl.max(amax, 0), INT8)
        tl.store(s_ptr + row * stride_s, scale)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < n_cols
            x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(q_row + cols, quantize_value(x, scale, INT8, EXACT), mask=ok)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, group: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (16- or 32-bit) -> (q [M, K] in `dtype`, float32 scales [M, 1]) per token, or [M, ceil(K / group)]
    with a power-of-two `group`."""
    assert x.dim() == 2 and x.stride(1) == 1 and dtype in QUANT_DTYPES
    m, k = x.shape
    q = torch.empty(m, k, dtype=dtype, device=x.device)
    scales = torch.empty(m, triton.cdiv(k, group) if group else 1, dtype=torch.float32, device=x.device)
    block = group or min(4096, triton.next_power_of_2(k))
    if m:
        _quantize_rows_kernel[(m, scales.shape[1])](
            x, q, scales, x.stride(0), q.stride(0), scales.stride(0), k, GROUP=group, BLOCK=block,
            EXACT=interpreting(), num_warps=max(1, min(8, block // 256)), **pdl_options(x.device))
    return q, scales
