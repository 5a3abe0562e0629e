"""out = (a * a_scales) @ (w * w_scales).T (+ bias) for 8-bit a [M, K] and w [N, K], both float8 (e4m3) or both int8:
the Triton scaled GEMM of the FP8 and W8A8 layers.

Two scalings, picked by the scales' shapes:
- block (HF's fine-grained checkpoints, DeepSeek-V3's layout): a_scales [M, ceil(K/128)] per token and 128-column
  group, w_scales [N, ceil(K/128)] per output row and group (quantization/fp8.py keeps a 128x128 block grid widened
  over its rows, so column-parallel splits stay exact). Each 128-wide K step's product is scaled into the float32
  sum: the scales change at every step, which cuBLASLt's row-wise `_scaled_mm` cannot express.
- row-wise (a_scales [M, 1], w_scales [N, 1] or [1, N]): the sum is scaled once at the end, the same product as
  `torch._scaled_mm(..., scale_a, scale_b)` (fp8) or torch._int_mm with the scaling after (int8), in one kernel:
  benchmarks/scaled_gemm_bench.py times them against each other.
8-bit tensor-core dots on Hopper (wgmma e4m3, or s8 with exact int32 sums); programs walk M tiles in groups of
GROUP_M per N column.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels import grouped_tile, interpreting, pdl_options, pdl_prologue

GROUP_K = 128  # the block formats' group width, which is this kernel's K step


@triton.jit(do_not_specialize=["M"])
def _scaled_gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, M, N, K, stride_am, stride_wn, stride_om, stride_asm, stride_wsn,
    BLOCK_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, UPCAST: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_a = tl.where(m < M, m, 0).to(tl.int64)  # rows past M and N re-read row 0 and are not stored
    rows_w = tl.where(n < N, n, 0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    pdl_prologue(USE_PDL)
    INT8: tl.constexpr = a_ptr.dtype.element_ty == tl.int8
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32 if INT8 else tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        cols = step * BLOCK_K + k
        a = tl.load(a_ptr + rows_a[:, None] * stride_am + cols[None, :], mask=cols[None, :] < K, other=0.0)
        w = tl.load(w_ptr + rows_w[None, :] * stride_wn + cols[:, None], mask=cols[:, None] < K, other=0.0)
        if UPCAST:  # the interpreter has no 8-bit dot (float32 sums of int8 products stay exact to K = 1024)
            part = tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee").to(acc.dtype)
        else:
            part = tl.dot(a, w, out_dtype=acc.dtype)
        if BLOCK_SCALES:
            sa = tl.load(as_ptr + rows_a * stride_asm + step)
            sw = tl.load(ws_ptr + rows_w * stride_wsn + step)
            acc += part * sa[:, None] * sw[None, :]
        else:
            acc += part
    if BLOCK_SCALES:
        res = acc
    else:
        res = acc.to(tl.float32) * tl.load(as_ptr + rows_a * stride_asm)[:, None]
        res *= tl.load(ws_ptr + rows_w * stride_wsn)[None, :]
    if HAS_BIAS:
        res += tl.load(b_ptr + rows_w).to(tl.float32)[None, :]
    ok = (m < M)[:, None] & (n < N)[None, :]
    tl.store(out_ptr + m.to(tl.int64)[:, None] * stride_om + n[None, :], res.to(out_ptr.dtype.element_ty), mask=ok)


def default_config(m: int) -> dict[str, int]:
    """Tile by row count (guesses until an H200 sweep: benchmarks/scaled_gemm_bench.py --sweep)."""
    if m <= 64:
        return dict(BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=64, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


def scaled_gemm(a: torch.Tensor, a_scales: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor,
             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
             config: dict[str, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] and w [N, K], both float8_e4m3fn or both int8; scales float32, block-wise ([M, ceil(K/128)] and
    [N, ceil(K/128)], fp8 only) or row-wise ([M, 1] and [N, 1] / [1, N]). Returns [M, N] in out_dtype."""
    (m, k), n = a.shape, w.shape[0]
    assert w.shape[1] == k and a.stride(1) == 1 and w.stride(1) == 1 and a.dtype == w.dtype
    assert a.dtype in (torch.float8_e4m3fn, torch.int8), f"scaled_gemm: 8-bit operands, not {a.dtype}"
    groups = triton.cdiv(k, GROUP_K)
    block_scales = a_scales.shape[1] == groups and w_scales.shape == (n, groups) and groups > 1
    assert not (block_scales and a.dtype == torch.int8), "scaled_gemm: block scales are for float8"
    if not block_scales:
        assert a_scales.numel() == m and w_scales.numel() == n, "scaled_gemm: scales neither block-wise nor row-wise"
        a_scales, w_scales = a_scales.reshape(m, 1), w_scales.reshape(n, 1)
    cfg = dict(config or default_config(m))
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    block_k = GROUP_K if block_scales else cfg.pop("BLOCK_K", GROUP_K)
    cfg.pop("BLOCK_K", None)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device) if out is None else out
    if m:
        grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
        _scaled_gemm_kernel[grid](
            a, a_scales, w, w_scales, bias if bias is not None else out, out, m, n, k, a.stride(0), w.stride(0),
            out.stride(0), a_scales.stride(0), w_scales.stride(0), BLOCK_SCALES=block_scales,
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
            UPCAST=interpreting(), **cfg, **pdl_options(a.device))
    return out


def scaled_gemm_ref(a: torch.Tensor, a_scales: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product in float64 from the dequantized operands."""
    def dequant(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = s.reshape(x.shape[0], -1).double()
        if s.shape[1] > 1:
            s = s.repeat_interleave(GROUP_K, dim=1)[:, : x.shape[1]]
        return x.double() * s

    out = dequant(a, a_scales) @ dequant(w, w_scales).T
    return out + bias.double() if bias is not None else out
