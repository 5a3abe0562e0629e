"""out = x @ weight.T (+ bias) for decode batches of a few rows on CUDA, weight [N, K]
(`pagedllm.layers.linear` says when it is used: row-major weights only, as on column-major ones,
whose programs read only BLOCK_N contiguous values per input column, cuBLAS is faster).

At these sizes a linear layer is a stream of its weight (10-250 us for Llama-3-8B's), and cuBLAS's
kernel only starts that stream once the kernel before it has finished. This one is launched with
programmatic dependent launch: its programs become resident while the kernel before it (the RMSNorm
that feeds it) still runs, each loads its first weight tile, which does not depend on that kernel,
and only then waits for it and reads the input rows. Its own early `launch_dependents` lets the
kernel after it (rotary + KV write, SiLU-and-mul, the sampler's draw) start the same way.

One program takes BLOCK_N output features over the whole input width. One row is multiplied with
FMAs into a [BLOCK_N, BLOCK_K] float32 accumulator summed once at the end; 2-16 rows go through a
tensor-core dot with the rows padded to 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels import dot_precision, pdl_options, tile_dot

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


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_x, stride_wn, stride_wk, stride_o,
    M, M_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, USE_PDL: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)
    # rows past N re-read row 0; one of the strides is 1 (row- or column-major), which Triton specialises on
    w_ptrs = w_ptr + tl.where(n_ok, n, 0).to(tl.int64)[:, None] * stride_wn + k.to(tl.int64)[None, :] * stride_wk
    w = _load_w(w_ptrs, 0, stride_wk, k, K, EVEN_K)  # before the wait: the weights do not depend on the kernel before
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
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


def gemv_config(rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) for a row-major weight: the best tiles of a sweep at
    Llama-3-8B's and Qwen3-0.6B's qkv, gate_up and LM-head shapes on an H200 (benchmarks/RESULTS.md,
    session 10), each faster than cuBLAS at every one of those shapes."""
    return (8, 512, 4, 3) if rows == 1 else (32, 256, 4, 3)


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """`config`: (BLOCK_N, BLOCK_K, num_warps, num_stages) instead of `gemv_config`'s (tile sweeps)."""
    rows, k = x.shape
    n = weight.shape[0]
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype) if out is None else out
    if rows == 0:
        return out
    bn, bk, warps, stages = config or gemv_config(rows)
    bk = min(bk, triton.next_power_of_2(k))
    prec, upcast = dot_precision(x.dtype)
    _gemv_kernel[(triton.cdiv(n, bn),)](
        x, weight, weight if bias is None else bias, out, n, k, x.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
        rows, M_PAD=1 if rows == 1 else 16, HAS_BIAS=bias is not None, EVEN_K=k % bk == 0,
        BLOCK_N=bn, BLOCK_K=bk, PREC=prec, UPCAST=upcast, num_warps=warps, num_stages=stages, **pdl_options(x.device),
    )
    return out
