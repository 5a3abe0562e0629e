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

A float8_e4m3fn or int8 weight with one float32 scale per output row (`weight_scale`; fp8 and W8A8 layers' decode
products) is a compile-time variant: its tiles are widened in-kernel (to float32, or to the rows' dtype for the dot) and the sums
scaled per row before the bias; the rows stay 16-bit (W8A16).

4- and 8-bit integer weights (`int_weight`: pagedllm/quantization/int_utils.py's layout, per-group scales and zeros)
are another (BITS > 0): a tile is [BLOCK_N, BLOCK_K * BITS / 32] int32 words, a few contiguous ones per row, unpacked
and dequantized in registers (`dequantize_tile`) to float32 for one row or the rows' dtype for the dot. Splits of the
input width and tile edges fall on multiples of BLOCK_K, so one tile spans one group or whole groups.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.kernels import dequantize_tile, dot_precision, group_mode, pdl_options, pdl_prologue, tile_dot


@triton.jit
def _load_w(w_ptrs, k0, stride_wk, k, K, EVEN_K: tl.constexpr):
    """The weight tile at input columns k0 + k (k0 * stride_wk < K * N fits int32 for any weight under 4 GB)."""
    if EVEN_K:
        return tl.load(w_ptrs + k0 * stride_wk)
    return tl.load(w_ptrs + k0 * stride_wk, mask=(k0 + k)[None, :] < K, other=0.0)


@triton.jit
def _accumulate(acc, w, x_ptr, stride_x, k0, k, K, M, M_PAD: tl.constexpr, EVEN_K: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr, WIDEN: tl.constexpr):
    if M_PAD == 1:
        if EVEN_K:
            x = tl.load(x_ptr + k0 + k)
        else:
            x = tl.load(x_ptr + k0 + k, mask=k0 + k < K, other=0.0)
        return acc + w.to(tl.float32) * x.to(tl.float32)[None, :]
    m = tl.arange(0, M_PAD)
    x = tl.load(x_ptr + m[:, None] * stride_x + (k0 + k)[None, :], mask=(m[:, None] < M) & ((k0 + k)[None, :] < K), other=0.0)
    if WIDEN:  # fp8 / int8 weights widened (exactly: e4m3 and int8 fit bf16 and fp16), integer ones rounded, to the
        # rows' dtype; float32 where the dot upcasts anyway (the interpreter, whose int8 -> bf16 cast is broken)
        w = w.to(tl.float32) if UPCAST else w.to(x.dtype)
    return acc + tile_dot(w, tl.trans(x), PREC, UPCAST)


@triton.jit
def _load_words(w_ptrs, k0, K, BITS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The packed words of input columns k0.. (K, a multiple of 32 / BITS, is whole words)."""
    PER: tl.constexpr = 32 // BITS
    if EVEN_K:
        return tl.load(w_ptrs + k0 // PER)
    return tl.load(w_ptrs + k0 // PER, mask=(k0 // PER + tl.arange(0, BLOCK_K // PER))[None, :] < K // PER, other=0)


# M, the row count, changes from step to step: not specialised on (Triton would compile a variant for 16 rows,
# a multiple of 16, in the middle of an eager run), as the attention kernels' step-varying ints are not.
@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, s_ptr, out_ptr, N, K, K_SPLIT, stride_x, stride_wn, stride_wk, stride_o, stride_split,
    M, M_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, USE_PDL: tl.constexpr,
    z_ptr=None, BITS: tl.constexpr = 0, GROUP_SIZE: tl.constexpr = 0, GROUP_MODE: tl.constexpr = 0,
):
    """Program (i, s): outputs i * BLOCK_N.. over inputs s * K_SPLIT..; with several splits `out_ptr` is
    a float32 [splits, M, N] buffer of partial sums (stride_split apart) that `_sum_splits_kernel` adds up.
    HAS_SCALE: w_ptr is float8 and every sum (each split's partial one) is multiplied by its row's s_ptr[n]; s_ptr is
    None otherwise, so the 16-bit kernels keep their parameters and code.
    BITS > 0: w_ptr holds the packed int32 codes (rows stride_wn apart, stride_wk unused), s_ptr and z_ptr the
    scales and zeros [N, ceil(K / GROUP_SIZE)] (`dequantize_tile`'s GROUP_SIZE and GROUP_MODE); z_ptr is None and
    BITS 0 for the other weights, whose code is that of before this variant."""
    split = tl.program_id(1)
    if BITS == 0:
        w_ptr += split.to(tl.int64) * K_SPLIT * stride_wk
    else:
        groups = tl.cdiv(K, GROUP_SIZE)  # before K becomes this split's width: the scales' row length
        w_ptr += split * (K_SPLIT // (32 // BITS))
    x_ptr += split * K_SPLIT
    out_ptr += split.to(tl.int64) * stride_split
    K = tl.minimum(K - split * K_SPLIT, K_SPLIT)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)
    if BITS == 0:
        # rows past N re-read row 0; one of the strides is 1 (row- or column-major), which Triton specialises on
        w_ptrs = w_ptr + tl.where(n_ok, n, 0).to(tl.int64)[:, None] * stride_wn + k.to(tl.int64)[None, :] * stride_wk
        w = _load_w(w_ptrs, 0, stride_wk, k, K, EVEN_K)  # before the wait: the weights do not depend on the kernel before
        pdl_prologue(USE_PDL)
        acc = tl.zeros([BLOCK_N, BLOCK_K] if M_PAD == 1 else [BLOCK_N, M_PAD], tl.float32)
        acc = _accumulate(acc, w, x_ptr, stride_x, 0, k, K, M, M_PAD, EVEN_K, PREC, UPCAST, HAS_SCALE)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            acc = _accumulate(acc, _load_w(w_ptrs, k0, stride_wk, k, K, EVEN_K), x_ptr, stride_x, k0, k, K, M, M_PAD,
                              EVEN_K, PREC, UPCAST, HAS_SCALE)
    else:
        rows = tl.where(n_ok, n, 0)
        w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + tl.arange(0, BLOCK_K // (32 // BITS))[None, :]
        words = _load_words(w_ptrs, 0, K, BITS, EVEN_K, BLOCK_K)  # before the wait, as above
        pdl_prologue(USE_PDL)
        acc = tl.zeros([BLOCK_N, BLOCK_K] if M_PAD == 1 else [BLOCK_N, M_PAD], tl.float32)
        k_first = split * K_SPLIT  # the input column of this split's first tile, for its group
        w = dequantize_tile(words, s_ptr, z_ptr, rows, groups, k_first, BITS, GROUP_SIZE, GROUP_MODE, BLOCK_K)
        acc = _accumulate(acc, w, x_ptr, stride_x, 0, k, K, M, M_PAD, EVEN_K, PREC, UPCAST, True)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            w = dequantize_tile(_load_words(w_ptrs, k0, K, BITS, EVEN_K, BLOCK_K), s_ptr, z_ptr, rows, groups,
                                k_first + k0, BITS, GROUP_SIZE, GROUP_MODE, BLOCK_K)
            acc = _accumulate(acc, w, x_ptr, stride_x, k0, k, K, M, M_PAD, EVEN_K, PREC, UPCAST, True)
        # the scales are applied to the tiles: none is left for the sums
    if M_PAD == 1:
        y = tl.sum(acc, axis=1)
        if HAS_SCALE:  # rows past N multiply by 0 and are not stored
            y *= tl.load(s_ptr + n, mask=n_ok, other=0.0)
        if HAS_BIAS:
            y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + n, y.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        if HAS_SCALE:
            acc *= tl.load(s_ptr + n, mask=n_ok, other=0.0)[:, None]
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


def split_width(k: int, bk: int, splits: int, out: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """(K_SPLIT, splits, partial-sum buffer) for an input width k in `splits` parts of whole BLOCK_K tiles (fewer
    where the tiles run out), so each split's tiles start at its own multiple of BLOCK_K. The buffer is `out` for one
    part (the first kernel writes the result), else float32 [splits, M, N] for `sum_splits`."""
    k_split = triton.cdiv(triton.cdiv(k, splits), bk) * bk
    splits = triton.cdiv(k, k_split)
    part = out if splits == 1 else torch.empty(splits, *out.shape, device=out.device, dtype=torch.float32)
    return k_split, splits, part


def sum_splits(part: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None, spare: torch.Tensor,
               pdl: dict[str, bool]) -> None:
    """The second kernel of a product whose input width was split (gemv, int_gemm, gguf_gemm): out = the float32
    partial sums part [splits, M, N] added in split order, + bias. Nothing when `part` is `out` (one split: the first
    kernel wrote out, bias included). `spare` stands in for a missing bias (never read); each caller passes the
    tensor it always passed, so its launches keep their compiled variant."""
    if part is out:
        return
    rows, n = out.shape
    _sum_splits_kernel[(triton.cdiv(n, 1024), rows)](
        part, spare if bias is None else bias, out, n, part.stride(0), out.stride(0),
        SPLITS=part.shape[0], HAS_BIAS=bias is not None, BLOCK=1024, num_warps=4, **pdl,
    )


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


def check_int_weight(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                      group_size: int) -> None:
    """That an integer weight is in the layout the kernels take (see `gemv`'s int_weight)."""
    k = x.shape[1]
    groups = -(-k // group_size)
    assert bits in (4, 8), f"{bits}-bit weights: 4 or 8 bits only"
    assert packed.dtype == torch.int32 and packed.shape[1] * 32 == k * bits and packed.stride(1) == 1, \
        "packed int32 [N, K * bits / 32], rows contiguous"
    assert scales.shape == zeros.shape == (packed.shape[0], groups), "scales and zeros [N, ceil(K / group_size)]"
    assert scales.is_contiguous() and zeros.is_contiguous() and x.stride(1) == 1, "contiguous scales, zeros, rows"
    assert scales.dtype == x.dtype and zeros.dtype == torch.uint8, "scales in x's dtype, uint8 zeros"


def int_gemv_config(rows: int, n: int, k: int, bits: int, group_size: int) -> tuple[int, int, int, int, int]:
    """`gemv_config`'s tuple for integer weights. GUESSES, not yet swept on a GPU (benchmarks/int_gemm_bench.py
    --sweep): a tile of 4-bit codes is a quarter of the 16-bit one's bytes, so one row takes twice the outputs
    per program for as many in flight, and one more stage; several rows, the 16-bit tiles (BLOCK_K 128: one group of
    the usual 128)."""
    del bits, group_size
    if rows == 1:
        if n < 4096:
            return 8, 512, 4, 4, 1
        return (16, 1024, 8, 4, 1) if k >= 8192 else (16, 512, 4, 4, 1)
    return gemv_config(rows, n, k)


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
    config: tuple[int, int, int, int, int] | None = None, weight_scale: torch.Tensor | None = None,
    int_weight: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
) -> torch.Tensor:
    """`config`: (BLOCK_N, BLOCK_K, num_warps, num_stages, splits) instead of `gemv_config`'s (tile
    sweeps). With several splits of the input width, float32 partial sums go through a second kernel.

    weight_scale: N float32 scales (any shape, contiguous: [N, 1] or [1, N]) of a float8_e4m3fn or int8 weight,
    out = x @ (weight * scale).T (+ bias) with x kept in its 16-bit dtype (W8A16: at these row counts the weight
    stream is the cost, halved in fp8). Each split's partial sum is scaled in the first kernel, so the second
    one is the 16-bit path's; the split order is fixed, so the result is the same every run.

    int_weight: (scales, zeros, bits, group_size) of an integer weight whose packed int32 codes [N, K * bits / 32]
    are `weight` (pagedllm/quantization/int_utils.py's layout: scales [N, G] in x's dtype, zeros uint8 [N, G],
    both contiguous); out = x @ dequantize(weight).T (+ bias)."""
    rows, k = x.shape
    n = weight.shape[0]
    scaled = weight.dtype in (torch.float8_e4m3fn, torch.int8) and int_weight is None
    assert (weight_scale is not None) == scaled, "fp8 and int8 weights, and only they, take per-row scales"
    if weight_scale is not None:
        assert weight_scale.dtype == torch.float32, "float32 weight scales"
        assert weight_scale.numel() == n and weight_scale.is_contiguous(), "one contiguous scale per output row"
    scales = zeros = None
    bits, gs, mode = 0, 0, 0
    if int_weight is not None:
        scales, zeros, bits, group_size = int_weight
        check_int_weight(x, weight, scales, zeros, bits, group_size)
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype) if out is None else out
    if rows == 0:
        return out
    # TODO: fp8 tiles need their own GPU sweep (half the bytes per row: wider BLOCK_K may pay); the 16-bit ones for now
    if config is None:
        config = gemv_config(rows, n, k) if int_weight is None else int_gemv_config(rows, n, k, bits, group_size)
    bn, bk, warps, stages, splits = config
    bk = min(bk, triton.next_power_of_2(k))
    if int_weight is not None:
        bk = max(bk, 16)  # whole words, and the dot's least width
        gs, mode = group_mode(k, group_size, bk)
    k_split, splits, part = split_width(k, bk, splits, out)
    prec, upcast = dot_precision(x.dtype)
    pdl = pdl_options(x.device)
    own_bias = bias if splits == 1 else None  # with splits, the bias is added once, to the summed splits
    # integer weights' variant only: the 16-bit and fp8 ones take the defaults (z_ptr None, BITS 0)
    extra = dict(z_ptr=zeros, BITS=bits, GROUP_SIZE=gs, GROUP_MODE=mode) if int_weight is not None else {}
    _gemv_kernel[(triton.cdiv(n, bn), splits)](
        x, weight, weight if own_bias is None else own_bias, weight_scale if int_weight is None else scales, part,
        n, k, k_split,
        x.stride(0), weight.stride(0), weight.stride(1), part.stride(-2), part.stride(0) if splits > 1 else 0,
        rows, M_PAD=1 if rows == 1 else 16, HAS_BIAS=own_bias is not None, HAS_SCALE=weight_scale is not None,
        EVEN_K=k % bk == 0,
        BLOCK_N=bn, BLOCK_K=bk, PREC=prec, UPCAST=upcast, num_warps=warps, num_stages=stages, **pdl, **extra,
    )
    sum_splits(part, out, bias, weight, pdl)
    return out
