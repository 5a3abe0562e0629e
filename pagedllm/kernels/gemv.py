"""out = x @ weight.T (+ bias) for decode batches of a few rows on CUDA, weight [N, K] row- or
column-major. `pagedllm.layers.linear` runs every half-precision product of up to 16 rows through it on
Hopper and later, with every weight row-major there (column-major weights, even with splits of the input
width, lost to cuBLAS by 1.4-4.8x: RESULTS.md, session 11).

At these sizes a linear layer is a stream of its weight (10-250 us for Llama-3-8B's), and cuBLAS's
kernel only starts that stream once the kernel before it has finished. This one is launched with
programmatic dependent launch: its programs become resident while the kernel before it (the RMSNorm,
attention or SiLU-and-mul that feeds it) still runs, each loads its first weight tile, which does not depend on that kernel,
and only then waits for it and reads the input rows. Its own early `launch_dependents` lets the
kernel after it (rotary + KV write, RMSNorm, SiLU-and-mul, the sampler's draw) start the same way.

One program takes BLOCK_N output features over the whole input width, or over one of `splits` parts of
it, whose float32 partial sums a second kernel adds in a fixed order (the same result every run). One
row is multiplied with FMAs into a [BLOCK_N, BLOCK_K] float32 accumulator summed once at the end; 2-16
rows go through a tensor-core dot with the rows padded to 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels import dot_precision, pdl_options, pdl_prologue, tile_dot


@triton.jit
def _load_w(w_ptrs, k0, stride_wk, k, K, EVEN_K: tl.constexpr):
    """The weight tile at input columns k0 + k (k0 * stride_wk < K * N fits int32 for any weight under 4 GB)."""
    if EVEN_K:
        return tl.load(w_ptrs + k0 * stride_wk)
    return tl.load(w_ptrs + k0 * stride_wk, mask=(k0 + k)[None, :] < K, other=0.0)


@triton.jit
def _accumulate(acc, w, x_ptr, stride_x, k0, k, K, M, M_PAD: tl.constexpr, EVEN_K: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    if M_PAD == 1:
        if EVEN_K:
            x = tl.load(x_ptr + k0 + k)
        else:
            x = tl.load(x_ptr + k0 + k, mask=k0 + k < K, other=0.0)
        return acc + w.to(tl.float32) * x.to(tl.float32)[None, :]
    m = tl.arange(0, M_PAD)
    x = tl.load(x_ptr + m[:, None] * stride_x + (k0 + k)[None, :], mask=(m[:, None] < M) & ((k0 + k)[None, :] < K), other=0.0)
    return acc + tile_dot(w, tl.trans(x), PREC, UPCAST)


# M, the row count, changes from step to step: not specialised on (Triton would compile a variant for 16 rows,
# a multiple of 16, in the middle of an eager run), as the attention kernels' step-varying ints are not.
@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, N, K, K_SPLIT, stride_x, stride_wn, stride_wk, stride_o, stride_split,
    M, M_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Program (i, s): outputs i * BLOCK_N.. over inputs s * K_SPLIT..; with several splits `out_ptr` is
    a float32 [splits, M, N] buffer of partial sums (stride_split apart) that `_sum_splits_kernel` adds up."""
    split = tl.program_id(1)
    w_ptr += split.to(tl.int64) * K_SPLIT * stride_wk
    x_ptr += split * K_SPLIT
    out_ptr += split.to(tl.int64) * stride_split
    K = tl.minimum(K - split * K_SPLIT, K_SPLIT)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)
    # rows past N re-read row 0; one of the strides is 1 (row- or column-major), which Triton specialises on
    w_ptrs = w_ptr + tl.where(n_ok, n, 0).to(tl.int64)[:, None] * stride_wn + k.to(tl.int64)[None, :] * stride_wk
    w = _load_w(w_ptrs, 0, stride_wk, k, K, EVEN_K)  # before the wait: the weights do not depend on the kernel before
    pdl_prologue(USE_PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K] if M_PAD == 1 else [BLOCK_N, M_PAD], tl.float32)
    acc = _accumulate(acc, w, x_ptr, stride_x, 0, k, K, M, M_PAD, EVEN_K, PREC, UPCAST)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        acc = _accumulate(acc, _load_w(w_ptrs, k0, stride_wk, k, K, EVEN_K), x_ptr, stride_x, k0, k, K, M, M_PAD, EVEN_K, PREC, UPCAST)
    if M_PAD == 1:
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + n, y.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        m = tl.arange(0, M_PAD)
        tl.store(out_ptr + m[None, :] * stride_o + n[:, None], acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & (m[None, :] < M))


@triton.jit
def _sum_splits_kernel(part_ptr, b_ptr, out_ptr, N, stride_split, stride_o, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """out[m] = the splits' partial sums of row m in split order (the same sum every run) + bias."""
    pdl_prologue(USE_PDL)
    m = tl.program_id(1)
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = n < N
    y = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SPLITS):
        y += tl.load(part_ptr + s * stride_split + m * N + n, mask=ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_o + n, y.to(out_ptr.dtype.element_ty), mask=ok)


def gemv_config(rows: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, splits) for a row-major [n, k] weight, from sweeps at
    Llama-3-8B's and Qwen3-0.6B's layer shapes on an H200 (benchmarks/gemv_bench.py --sweep; RESULTS.md,
    sessions 10-11). One row: narrow layers take 4 outputs per program (enough programs without splits),
    long rows (down_proj) wide tiles and 8 warps. Several rows: 64 outputs per program, and the input width
    split until there are ~192 programs, each split keeping at least 4 tiles."""
    if rows == 1:
        if n < 4096:
            return 4, 1024, 4, 3, 1
        return (16, 1024, 8, 3, 1) if k >= 8192 else (8, 512, 4, 3, 1)
    bn, bk, splits = 64, 128, 1
    while triton.cdiv(n, bn) * splits < 192 and k >= 2 * splits * 4 * bk:
        splits *= 2
    return bn, bk, 4, 3, splits


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """`config`: (BLOCK_N, BLOCK_K, num_warps, num_stages, splits) instead of `gemv_config`'s (tile
    sweeps). With several splits of the input width, float32 partial sums go through a second kernel."""
    rows, k = x.shape
    n = weight.shape[0]
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype) if out is None else out
    if rows == 0:
        return out
    bn, bk, warps, stages, splits = config or gemv_config(rows, n, k)
    bk = min(bk, triton.next_power_of_2(k))
    k_split = triton.cdiv(triton.cdiv(k, splits), bk) * bk  # whole tiles per split
    splits = triton.cdiv(k, k_split)
    part = out if splits == 1 else torch.empty(splits, rows, n, device=x.device, dtype=torch.float32)
    prec, upcast = dot_precision(x.dtype)
    pdl = pdl_options(x.device)
    own_bias = bias if splits == 1 else None  # with splits, the bias is added once, to the summed splits
    _gemv_kernel[(triton.cdiv(n, bn), splits)](
        x, weight, weight if own_bias is None else own_bias, part, n, k, k_split,
        x.stride(0), weight.stride(0), weight.stride(1), part.stride(-2), part.stride(0) if splits > 1 else 0,
        rows, M_PAD=1 if rows == 1 else 16, HAS_BIAS=own_bias is not None, EVEN_K=k % bk == 0,
        BLOCK_N=bn, BLOCK_K=bk, PREC=prec, UPCAST=upcast, num_warps=warps, num_stages=stages, **pdl,
    )
    if splits > 1:
        _sum_splits_kernel[(triton.cdiv(n, 1024), rows)](
            part, weight if bias is None else bias, out, n, part.stride(0), out.stride(0),
            SPLITS=splits, HAS_BIAS=bias is not None, BLOCK=1024, num_warps=4, **pdl,
        )
    return out
