"""out = x @ dequantize(weight).T (+ bias) for 4- and 8-bit integer weights (W4A16 / W8A16) in
pagedllm/quantization/int_utils.py's layout, and `int_linear_cuda`, which the integer quantization methods call.

Products of up to 16 rows go through the GEMV of `pagedllm.kernels.gemv` (its integer variant): there the cost is the
weight stream, a quarter (4 bits) or a half (8 bits) of the 16-bit one. Anything larger goes through this GEMM: a
[BLOCK_M, BLOCK_N] output tile per program, looping over BLOCK_K input columns; each step loads the x tile and the
[BLOCK_N, BLOCK_K * bits / 32] packed words, unpacks them in registers (shifts and masks: codes are packed along K,
so a row's tile is a few contiguous words), dequantizes to x's dtype (`dequantize_tile`: the host picks BLOCK_K
dividing the group size, so one scale and zero per row and tile) and feeds a tensor-core dot with float32 sums.
The dot computes out.T = w @ x.T, the dequantized weight as its first operand: on Hopper, wgmma takes that operand
from registers, where the weight is made, and the second from shared memory, where the pipelined loads of x
land (x @ w.T would store every dequantized tile to shared memory first). BLOCK_N is then the wgmma's M (64 per
warp group) and BLOCK_M its N (down to 16 rows).
Dequantizing once per [BLOCK_N, BLOCK_K] tile is amortised over BLOCK_M rows: prefill tiles take 128 rows and
are as compute-bound as the 16-bit GEMM; 17-64 rows (decode batches) take narrower tiles and, when that leaves
the GPU's SMs short of programs, split the input width (float32 partial sums added in a fixed order by the
GEMV's second kernel, so a result is the same every run). Programs run M tiles in groups of GROUP_M per N
column, so a weight tile is read from memory once per group rather than once per M tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels import (dequantize_tile, dot_precision, group_mode, grouped_tile, pdl_options, pdl_prologue,
                              sm_count, tile_dot)
from pagedllm.kernels.gemv import check_int_weight, gemv, split_width, sum_splits

GEMV_ROWS = 16  # products of up to this many rows go through the GEMV (as pagedllm.layers.linear's 16-bit ones)


@triton.jit(do_not_specialize=["M"])
def _int_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, K_SPLIT, stride_xm, stride_wn, stride_om, stride_split,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Program (t, s): output tile t over input columns s * K_SPLIT..; with several splits `out_ptr` is a float32
    [splits, M, N] buffer of partial sums (stride_split apart) and the bias is added by the second kernel."""
    PER: tl.constexpr = 32 // BITS
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    groups = tl.cdiv(K, GROUP_SIZE)  # scales' and zeros' row length
    k_first = split * K_SPLIT
    k_end = tl.minimum(K, k_first + K_SPLIT)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows past M and N re-read row 0 (unmasked loads) and are not stored
    rows_x = tl.where(m < M, m, 0).to(tl.int64)
    rows_w = tl.where(n < N, n, 0)
    k = tl.arange(0, BLOCK_K)
    kw = tl.arange(0, BLOCK_K // PER)
    x_ptrs = x_ptr + rows_x[:, None] * stride_xm + (k_first + k)[None, :]
    w_ptrs = w_ptr + rows_w.to(tl.int64)[:, None] * stride_wn + (k_first // PER + kw)[None, :]
    pdl_prologue(USE_PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # out.T: see the module's docstring
    for k0 in range(k_first, k_end, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            words = tl.load(w_ptrs)
        else:
            x = tl.load(x_ptrs, mask=(k0 + k)[None, :] < K, other=0.0)
            words = tl.load(w_ptrs, mask=(k0 // PER + kw)[None, :] < K // PER, other=0)
        w = dequantize_tile(words, s_ptr, z_ptr, rows_w, groups, k0, BITS, GROUP_SIZE, GROUP_MODE, BLOCK_K)
        acc += tile_dot(w.to(x.dtype), tl.trans(x), PREC, UPCAST)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // PER
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + split.to(tl.int64) * stride_split + m.to(tl.int64)[None, :] * stride_om + n[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(m < M)[None, :] & (n < N)[:, None])


def int_gemm_config(m: int, n: int, k: int, bits: int, group_size: int, sms: int = 132
                    ) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, splits). GUESSES for H100/H200, not yet swept
    (benchmarks/int_gemm_bench.py --sweep): prefill-sized batches take the 16-bit GEMM's usual 128x128x64 tiles;
    decode-sized ones (up to 64 rows) narrower tiles with longer K steps, and the input width split until there
    is about one wave of programs, each split keeping at least 4 K steps. BLOCK_K divides the group size (one scale
    per row and tile), down to 32."""
    del bits  # the same tiles for 4 and 8 bits until a sweep says otherwise
    if m <= 64:
        bm = max(16, triton.next_power_of_2(m))
        bn, bk, warps, stages = 64, 128, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if group_size < k and group_size < bk and group_size >= 32 and group_size & (group_size - 1) == 0:
        bk = group_size
    splits = 1
    if m <= 256:
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        while tiles * splits * 2 <= 1.5 * sms and k >= 2 * splits * 4 * bk:
            splits *= 2
    return bm, bn, bk, warps, stages, splits


def int_gemm(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
    bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
    config: tuple[int, int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] (unit stride along K) times the integer weight [N, K] (packed [N, K * bits / 32], scales [N, G] in
    x's dtype, zeros uint8 [N, G]); `config` instead of `int_gemm_config`'s (tile sweeps)."""
    rows, k = x.shape
    n = packed.shape[0]
    check_int_weight(x, packed, scales, zeros, bits, group_size)
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype) if out is None else out
    if rows == 0:
        return out
    bm, bn, bk, warps, stages, splits = config or int_gemm_config(rows, n, k, bits, group_size, sm_count(x.device))
    bk = max(min(bk, triton.next_power_of_2(k)), 16)
    gs, mode = group_mode(k, group_size, bk)
    k_split, splits, part = split_width(k, bk, splits, out)
    prec, upcast = dot_precision(x.dtype)
    pdl = pdl_options(x.device)
    own_bias = bias if splits == 1 else None
    grid = (triton.cdiv(rows, bm) * triton.cdiv(n, bn), splits)
    _int_gemm_kernel[grid](
        x, packed, scales, zeros, packed if own_bias is None else own_bias, part, rows, n, k, k_split,
        x.stride(0), packed.stride(0), part.stride(-2), part.stride(0) if splits > 1 else 0,
        BITS=bits, GROUP_SIZE=gs, GROUP_MODE=mode, HAS_BIAS=own_bias is not None, EVEN_K=k % bk == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, PREC=prec, UPCAST=upcast, num_warps=warps, num_stages=stages,
        **pdl,
    )
    sum_splits(part, out, bias, packed, pdl)
    return out


def int_linear_cuda(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                    group_size: int, in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, in_features] times the integer weight (+ bias): the GEMV for up to GEMV_ROWS rows, the GEMM beyond."""
    assert x.shape[-1] == in_features, f"{x.shape[-1]} input features, the weight takes {in_features}"
    x = x if x.stride(-1) == 1 else x.contiguous()
    scales, zeros = scales.contiguous(), zeros.contiguous()
    if x.shape[0] <= GEMV_ROWS:
        return gemv(x, packed, bias, int_weight=(scales, zeros, bits, group_size))
    return int_gemm(x, packed, scales, zeros, bits, group_size, bias)
