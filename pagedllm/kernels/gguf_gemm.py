"""out = x @ dequantize(raw).T (+ bias) for weights kept in GGUF blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K:
pagedllm/quantization/gguf.py's layout, uint8 [N, K / block_elems * block_bytes]), reading the block bytes in-kernel:
float16 d / dmin / m, K-quants' packed 6-bit scales, nibbles and high bits. `gguf_linear_cuda` is the dispatcher
GgufLinearMethod calls: the GEMV up to 16 rows (decode: the cost is the weight stream, ~0.56 bytes per weight in
Q4_K against 2 in bf16), the GEMM beyond.

A tile is BLOCK_N rows of NB whole blocks (BLOCK_K = NB * block elements). It is dequantized in the blocks' byte
order, not the columns': [R, G, L, H], G groups of L bytes (a block's, or a K-quant's sub-block's, quants), H
nibbles per byte, so the bytes load contiguously and each group's scale broadcasts over its bytes without shuffling
registers. The x tile is loaded in that same order instead (`_tile_cols` gives each tile element its input column):
a dot product does not care about the order of its terms, and x is small (and L1/L2-resident) beside the weight.

Both kernels follow pagedllm/kernels/gemv.py and int_gemm.py: fp32 accumulation (FMAs for one row, a tensor-core dot
for more, the dequantized weight as its first operand), splits of the input width on whole tiles whose float32
partial sums `_sum_splits_kernel` adds in a fixed order, and the GEMV's first weight tile dequantized before the
programmatic-dependent-launch wait. The output may be a column slice of a wider tensor (a fused layer's part).
Tile configs are GUESSES until benchmarks/gguf_gemm_bench.py runs on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels import dot_precision, grouped_tile, pdl_options, pdl_prologue, sm_count, tile_dot
from pagedllm.kernels.gemv import split_width, sum_splits
from pagedllm.quantization.gguf import BLOCKS, NAMES, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0

GEMV_ROWS = 16
# qtype -> (groups per block, bytes per group, nibbles per byte) of `_dequantize_tile`'s [R, G, L, H] order
_SHAPES = {Q4_0: (1, 16, 2), Q4_1: (1, 16, 2), Q8_0: (1, 32, 1), Q4_K: (4, 32, 2), Q5_K: (4, 32, 2), Q6_K: (8, 16, 2)}
# the ids as Triton globals (constexprs) for the kernels' branches
_Q4_0, _Q4_1, _Q8_0 = tl.constexpr(Q4_0), tl.constexpr(Q4_1), tl.constexpr(Q8_0)
_Q4_K, _Q5_K, _Q6_K = tl.constexpr(Q4_K), tl.constexpr(Q5_K), tl.constexpr(Q6_K)


@triton.jit
def _tile_cols(QTYPE: tl.constexpr, NB: tl.constexpr, QK: tl.constexpr):
    """[NB * QK] int32: the input column (from the tile's first) of each element of `_dequantize_tile`'s tile."""
    i = tl.arange(0, NB * QK)
    if QTYPE == _Q8_0:
        return i
    elif QTYPE == _Q4_0 or QTYPE == _Q4_1:  # group g = block; byte l holds columns l (low nibble) and l + 16
        g, r = i // 32, i % 32
        return 32 * g + r // 2 + 16 * (r % 2)
    elif QTYPE == _Q4_K or QTYPE == _Q5_K:  # group g = 64 columns; byte l: columns l (low), l + 32 (high)
        g, r = i // 64, i % 64
        return 64 * g + r // 2 + 32 * (r % 2)
    else:  # Q6_K: group g' = 4n + 2j + lh of 16 bytes: columns 128n + 32j + 16lh + l (low), + 64 (high)
        g, r = i // 32, i % 32
        gb = g % 8
        return 256 * (g // 8) + 16 * (gb + 4 * (gb // 4)) + r // 2 + 64 * (r % 2)


@triton.jit
def _ld(ptrs, ok, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=ok, other=0)


@triton.jit
def _half(ptrs, ok, EVEN: tl.constexpr):
    """The float16 fields at byte pointers `ptrs` (2-byte aligned in every format), as float32."""
    return _ld(ptrs.to(tl.pointer_type(tl.float16)), ok, EVEN).to(tl.float32)


@triton.jit
def _dequantize_tile(row_ptrs, b0, nblocks, QTYPE: tl.constexpr, NB: tl.constexpr, BS: tl.constexpr,
                     GPB: tl.constexpr, L: tl.constexpr, H: tl.constexpr, EVEN: tl.constexpr):
    """float32 [R, NB * block elements]: blocks b0.. of the rows at byte pointers `row_ptrs` [R], in [R, G, L, H]
    order (G = NB * GPB groups of L bytes, H nibbles each); blocks at or past `nblocks` read as zeros."""
    R: tl.constexpr = row_ptrs.shape[0]
    G: tl.constexpr = NB * GPB
    g = tl.arange(0, G)
    sub = g % GPB  # the group within its block
    gptr = row_ptrs[:, None] + ((b0 + g // GPB) * BS)[None, :]  # [R, G]: each group's block
    ok = ((b0 + g // GPB) < nblocks)[None, :]
    l = tl.arange(0, L)
    h = tl.arange(0, H)
    ok3 = ok[:, :, None]
    if QTYPE == _Q8_0:
        q = _ld(gptr[:, :, None] + 2 + l[None, None, :], ok3, EVEN).to(tl.int8, bitcast=True).to(tl.float32)
        w = q * _half(gptr, ok, EVEN)[:, :, None]
        return tl.reshape(w, [R, G * L])
    elif QTYPE == _Q4_0 or QTYPE == _Q4_1:
        QS: tl.constexpr = 2 if QTYPE == _Q4_0 else 4
        qs = _ld(gptr[:, :, None] + QS + l[None, None, :], ok3, EVEN).to(tl.int32)
        q = ((qs[:, :, :, None] >> (4 * h)[None, None, None, :]) & 15).to(tl.float32)
        d = _half(gptr, ok, EVEN)[:, :, None, None]
        if QTYPE == _Q4_0:
            w = (q - 8.0) * d
        else:
            w = q * d + _half(gptr + 2, ok, EVEN)[:, :, None, None]
        return tl.reshape(w, [R, G * L * H])
    elif QTYPE == _Q4_K or QTYPE == _Q5_K:
        # sub-block j = 2 * sub + h: its 6-bit scale and min from the 12 bytes at 4 (see quantization/gguf.py)
        j = (2 * sub)[:, None] + h[None, :]  # [G, 2]
        sptr = gptr[:, :, None] + 4
        ok_s = ok3
        a = _ld(sptr + j[None, :, :], ok_s, EVEN).to(tl.int32)  # byte j
        b = _ld(sptr + 4 + j[None, :, :], ok_s, EVEN).to(tl.int32)  # byte j + 4
        c = _ld(sptr + (j % 4)[None, :, :], ok_s, EVEN).to(tl.int32)  # byte j - 4 (for j >= 4)
        low = (j < 4)[None, :, :]
        sc = tl.where(low, a & 63, (b & 15) | ((c >> 6) << 4)).to(tl.float32)
        mn = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4)).to(tl.float32)
        ds = _half(gptr, ok, EVEN)[:, :, None] * sc  # [R, G, 2]
        dm = _half(gptr + 2, ok, EVEN)[:, :, None] * mn
        QS: tl.constexpr = 16 if QTYPE == _Q4_K else 48
        qs = _ld(gptr[:, :, None] + QS + (32 * sub)[None, :, None] + l[None, None, :], ok3, EVEN).to(tl.int32)
        q = (qs[:, :, :, None] >> (4 * h)[None, None, None, :]) & 15  # [R, G, 32, 2]
        if QTYPE == _Q5_K:  # the fifth bit: bit j of qh[l] (32 bytes at 16)
            qh = _ld(gptr[:, :, None] + 16 + l[None, None, :], ok3, EVEN).to(tl.int32)
            q |= ((qh[:, :, :, None] >> j[None, :, None, :]) & 1) << 4
        w = q.to(tl.float32) * ds[:, :, None, :] - dm[:, :, None, :]
        return tl.reshape(w, [R, G * L * H])
    else:  # Q6_K: group g' = 4n + 2j + lh: ql bytes 16g'.., qh bytes 128 + 32n + 16lh.., high bits at 2j + 4h
        n6, j6, lh = sub // 4, (sub // 2) % 2, sub % 2
        ql = _ld(gptr[:, :, None] + (16 * sub)[None, :, None] + l[None, None, :], ok3, EVEN).to(tl.int32)
        qh = _ld(gptr[:, :, None] + (128 + 32 * n6 + 16 * lh)[None, :, None] + l[None, None, :], ok3,
                 EVEN).to(tl.int32)
        shift = (2 * j6)[:, None] + 4 * h[None, :]  # [G, 2]
        q = ((ql[:, :, :, None] >> (4 * h)[None, None, None, :]) & 15) | \
            (((qh[:, :, :, None] >> shift[None, :, None, :]) & 3) << 4)
        # scale of 16 columns: index 8n + 2j + lh + 4h (int8, 16 bytes at 192)
        s_idx = (sub + 4 * n6)[:, None] + 4 * h[None, :]
        sc = _ld(gptr[:, :, None] + 192 + s_idx[None, :, :], ok3, EVEN).to(tl.int8, bitcast=True).to(tl.float32)
        ds = _half(gptr + 208, ok, EVEN)[:, :, None] * sc  # [R, G, 2]
        w = (q - 32).to(tl.float32) * ds[:, :, None, :]
        return tl.reshape(w, [R, G * L * H])


@triton.jit
def _accumulate(acc, w, x_ptr, stride_x, cols, K, M, M_PAD: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc += the tile's products with the x rows at input columns `cols` (past K: zeros)."""
    if M_PAD == 1:
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
        return acc + w * x.to(tl.float32)[None, :]
    m = tl.arange(0, M_PAD)
    x = tl.load(x_ptr + m[:, None] * stride_x + cols[None, :], mask=(m[:, None] < M) & (cols[None, :] < K), other=0.0)
    return acc + tile_dot(w.to(x.dtype), tl.trans(x), PREC, UPCAST)


@triton.jit(do_not_specialize=["M"])
def _gguf_gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, K_SPLIT, stride_x, stride_w, stride_o, stride_split,
    QTYPE: tl.constexpr, QK: tl.constexpr, BS: tl.constexpr, GPB: tl.constexpr, L: tl.constexpr, H: tl.constexpr,
    M_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Program (i, s): outputs i * BLOCK_N.. over input columns s * K_SPLIT..; with several splits `out_ptr` is a
    float32 [splits, M, N] buffer of partial sums (stride_split apart) that `_sum_splits_kernel` adds up."""
    BLOCK_K: tl.constexpr = NB * QK
    split = tl.program_id(1)
    k_first = split * K_SPLIT
    k_end = tl.minimum(K, k_first + K_SPLIT)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    row_ptrs = w_ptr + tl.where(n_ok, n, 0).to(tl.int64) * stride_w  # rows past N re-read row 0, not stored
    cols = _tile_cols(QTYPE, NB, QK)
    nblocks = K // QK
    # the first tile before the wait: the weights do not depend on the kernel before
    w = _dequantize_tile(row_ptrs, k_first // QK, nblocks, QTYPE, NB, BS, GPB, L, H, EVEN_K)
    pdl_prologue(USE_PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K] if M_PAD == 1 else [BLOCK_N, M_PAD], tl.float32)
    acc = _accumulate(acc, w, x_ptr, stride_x, k_first + cols, K, M, M_PAD, PREC, UPCAST)
    for k0 in range(k_first + BLOCK_K, k_end, BLOCK_K):
        w = _dequantize_tile(row_ptrs, k0 // QK, nblocks, QTYPE, NB, BS, GPB, L, H, EVEN_K)
        acc = _accumulate(acc, w, x_ptr, stride_x, k0 + cols, K, M, M_PAD, PREC, UPCAST)
    out_ptr += split.to(tl.int64) * stride_split
    if M_PAD == 1:
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + n, y.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        m = tl.arange(0, M_PAD)
        tl.store(out_ptr + m[None, :] * stride_o + n[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & (m[None, :] < M))


@triton.jit(do_not_specialize=["M"])
def _gguf_gemm_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, K_SPLIT, stride_xm, stride_w, stride_om, stride_split,
    QTYPE: tl.constexpr, QK: tl.constexpr, BS: tl.constexpr, GPB: tl.constexpr, L: tl.constexpr, H: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
    GROUP_M: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, USE_PDL: tl.constexpr,
):
    """int_gemm's `_int_gemm_kernel` for GGUF blocks: out.T tile [BLOCK_N, BLOCK_M] = w @ x.T, GROUP_M M tiles per
    N column in a row, splits of the input width into float32 partial sums."""
    BLOCK_K: tl.constexpr = NB * QK
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    k_first = split * K_SPLIT
    k_end = tl.minimum(K, k_first + K_SPLIT)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_x = tl.where(m < M, m, 0).to(tl.int64)
    row_ptrs = w_ptr + tl.where(n < N, n, 0).to(tl.int64) * stride_w
    cols = _tile_cols(QTYPE, NB, QK)
    nblocks = K // QK
    x_ptrs = x_ptr + rows_x[:, None] * stride_xm + cols[None, :]
    pdl_prologue(USE_PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(k_first, k_end, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs + k0)
        else:
            x = tl.load(x_ptrs + k0, mask=(k0 + cols)[None, :] < K, other=0.0)
        w = _dequantize_tile(row_ptrs, k0 // QK, nblocks, QTYPE, NB, BS, GPB, L, H, EVEN_K)
        acc += tile_dot(w.to(x.dtype), tl.trans(x), PREC, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + split.to(tl.int64) * stride_split + m.to(tl.int64)[None, :] * stride_om + n[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(m < M)[None, :] & (n < N)[:, None])


def _consts(qtype: int) -> dict[str, int]:
    qk, bs = BLOCKS[qtype]
    gpb, l, h = _SHAPES[qtype]
    return dict(QTYPE=qtype, QK=qk, BS=bs, GPB=gpb, L=l, H=h)


def _check(x: torch.Tensor, raw: torch.Tensor, qtype: int, out: torch.Tensor | None) -> None:
    qk, bs = BLOCKS.get(qtype, (0, 0))
    assert qk, f"no kernel for GGUF type {qtype}"
    k = x.shape[1]
    assert k % qk == 0, f"{NAMES[qtype]}: {k} input features are not whole blocks of {qk}"
    assert raw.dtype == torch.uint8 and raw.shape[1] == k // qk * bs and raw.stride(1) == 1, \
        "raw blocks uint8 [N, K / block elements * block bytes], rows contiguous"
    assert x.stride(1) == 1, "x rows contiguous"
    if out is not None:
        assert out.shape == (x.shape[0], raw.shape[0]) and out.stride(1) == 1 and out.dtype == x.dtype, "out [M, N]"


def _splits(k_split_tiles: int, programs: int, target: int) -> int:
    """Splits of the input width until there are `target` programs, each split keeping at least 4 tiles."""
    splits = 1
    while programs * splits * 2 <= target and k_split_tiles >= 2 * splits * 4:
        splits *= 2
    return splits


def gguf_gemv_config(rows: int, n: int, k: int, qtype: int, sms: int = 132) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, splits). GUESSES, not yet swept on a GPU (gguf_gemm_bench.py
    --sweep): int_gemv_config's shapes (BLOCK_K at least a block), and the input width split when the outputs alone
    leave the SMs short of programs (a Q6_K v_proj part of 1024 rows, say)."""
    qk = BLOCKS[qtype][0]
    if rows == 1:
        bn, bk, warps = (8, 512, 4) if n < 4096 else ((16, 1024, 8) if k >= 8192 else (16, 512, 4))
    else:
        bn, bk, warps = 32, 256, 4
    bk = max(bk, qk)
    return bn, bk, warps, 3, _splits(k // bk, triton.cdiv(n, bn), 2 * sms)


def gguf_gemm_config(m: int, n: int, k: int, qtype: int, sms: int = 132) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, splits). GUESSES (see gguf_gemv_config): int_gemm_config's
    tiles with BLOCK_K of whole blocks (256 for K-quants, so their prefill tiles take 64 outputs, not 128)."""
    qk = BLOCKS[qtype][0]
    if m <= 64:
        bm, bn, bk, warps, stages = max(16, triton.next_power_of_2(m)), 64, max(128, qk), 4, 3
    else:
        bm, bn, bk, warps, stages = (128, 128, 64, 8, 3) if qk == 32 else (128, 64, 256, 8, 3)
    splits = _splits(k // bk, triton.cdiv(m, bm) * triton.cdiv(n, bn), int(1.5 * sms)) if m <= 256 else 1
    return bm, bn, bk, warps, stages, splits


def _product(x: torch.Tensor, raw: torch.Tensor, qtype: int, bias: torch.Tensor | None, out: torch.Tensor | None,
             config: tuple[int, ...] | None, gemm: bool) -> torch.Tensor:
    """The GEMV's or the GEMM's launches (one path: the two kernels take the same arguments but for their tiles):
    config (BLOCK_M only for the GEMM, BLOCK_N, BLOCK_K, num_warps, num_stages, splits) or the config function's."""
    _check(x, raw, qtype, out)
    rows, k = x.shape
    n = raw.shape[0]
    config = config or (gguf_gemm_config if gemm else gguf_gemv_config)(rows, n, k, qtype, sm_count(x.device))
    bm, bn, bk, warps, stages, splits = config if gemm else (0, *config)
    consts = _consts(qtype)
    qk = consts["QK"]
    bk = max(qk, min(bk, triton.next_power_of_2(k)) // qk * qk)  # whole blocks
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype) if out is None else out
    k_split, splits, part = split_width(k, bk, splits, out)
    if rows == 0:
        return out
    prec, upcast = dot_precision(x.dtype)
    pdl = pdl_options(x.device)
    own_bias = bias if splits == 1 else None
    if gemm:
        kernel, grid = _gguf_gemm_kernel, (triton.cdiv(rows, bm) * triton.cdiv(n, bn), splits)
        tile = dict(BLOCK_M=bm, GROUP_M=8)
    else:
        kernel, grid, tile = _gguf_gemv_kernel, (triton.cdiv(n, bn), splits), dict(M_PAD=1 if rows == 1 else 16)
    kernel[grid](
        x, raw, raw if own_bias is None else own_bias, part, rows, n, k, k_split, x.stride(0), raw.stride(0),
        part.stride(-2), part.stride(0) if splits > 1 else 0, **consts, **tile, HAS_BIAS=own_bias is not None,
        EVEN_K=k % bk == 0, BLOCK_N=bn, NB=bk // qk, PREC=prec, UPCAST=upcast, num_warps=warps,
        num_stages=stages, **pdl,
    )
    sum_splits(part, out, bias, part, pdl)
    return out


def gguf_gemv(x: torch.Tensor, raw: torch.Tensor, qtype: int, bias: torch.Tensor | None = None,
              out: torch.Tensor | None = None, config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x [M <= 16, K] times the GGUF weight raw [N, row bytes]; `config` instead of gguf_gemv_config's."""
    return _product(x, raw, qtype, bias, out, config, gemm=False)


def gguf_gemm(x: torch.Tensor, raw: torch.Tensor, qtype: int, bias: torch.Tensor | None = None,
              out: torch.Tensor | None = None, config: tuple[int, int, int, int, int, int] | None = None
              ) -> torch.Tensor:
    """x [M, K] times the GGUF weight raw [N, row bytes]; `config` instead of gguf_gemm_config's."""
    return _product(x, raw, qtype, bias, out, config, gemm=True)


def gguf_linear_cuda(x: torch.Tensor, raw: torch.Tensor, qtype: int, in_features: int, bias: torch.Tensor | None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in_features] times the GGUF weight (+ bias), into `out` (a column slice of a wider output, say) if
    given: the GEMV for up to GEMV_ROWS rows, the GEMM beyond."""
    assert x.shape[-1] == in_features, f"{x.shape[-1]} input features, the weight takes {in_features}"
    x = x if x.stride(-1) == 1 else x.contiguous()
    if x.shape[0] <= GEMV_ROWS:
        return gguf_gemv(x, raw, qtype, bias, out)
    return gguf_gemm(x, raw, qtype, bias, out)
