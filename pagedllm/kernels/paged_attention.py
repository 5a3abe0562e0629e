"""Paged attention in Triton: one unified varlen kernel, and a split-KV (flash-decoding) variant.

Unified kernel: one launch serves a mixed batch of decodes and prefill chunks. A program owns a
tile of BLOCK_Q query tokens of one request and ALL the query heads that share one KV head, laid
out as BLOCK_M = BLOCK_Q * heads_per_kv rows (row m: token m // QPK, head m % QPK), so each K/V
tile is read once per KV head however large the GQA group. Keys are walked in TILE_N steps; each
key's physical block comes from the block table, so TILE_N need not equal the cache block size.
Softmax is online, in fp32, with exp2 and the scale folded into log2(e).

Tile -> request: request r owns grid tiles [qsl[r] // BLOCK_Q + r, qsl[r+1] // BLOCK_Q + r + 1),
at least ceil(len_r / BLOCK_Q) of them; a program finds its request by binary search on
query_start_loc (log2(num_reqs) scalar loads) and exits at once if its tile lies past the
request's end. The grid (num_tokens // BLOCK_Q + num_reqs, num_kv_heads) then depends only on
host integers: no host-side map to build and copy each step, and no device->host sync.

Split-KV decode: for decode-only batches with few programs' worth of (request, KV head) pairs,
each sequence's keys are cut into up to `num_parts` partitions handled by separate programs, which
write an unnormalised partial (max, sum, acc); a second kernel merges the partitions. The launch
shape depends only on the batch size and num_parts: each sequence sizes its partitions from its
own length on the device, so the path runs inside CUDA graphs, and a sequence's result never
depends on the others in the batch.

Shared-prefix decode (cascade attention): when every request of a decode-only batch starts with the
same cached blocks (one system prompt, n samples of one prompt, beams), the prefix's keys are read once
per KV head for all requests together: a first kernel attends every (request, query head) row to the
prefix in large tiles, as a prompt would, and writes unnormalised partials (split over the prefix to
fill the SMs); the decode kernel then starts each row's online softmax from those partials and walks
only the request's own keys. The prefix length is read on the device, so graphs replay it at any length.

A float8 cache (--kv-cache-dtype fp8; the kernels see it in the cache pointer's type, so 16-bit caches compile as
before) holds K / k_scale and V / v_scale: tiles are loaded in float8 and widened to q's dtype for the dots, k_scale is
folded into the softmax scale and v_scale into the output (or the split-KV partials), once per row rather than per key.

Per-layer score options, compile-time constants so that a kernel without them keeps its code:
- WINDOW (a sliding window, Mistral / Gemma's local layers; 0: none): the row at position p sees keys (p - W, p].
  Programs start their key walk at the first key their earliest row sees, so windowed layers read O(W) keys per
  row however long the context: the unified kernel from its tile's first row's window, split-KV partitions the
  window instead of the whole sequence, the shared-prefix kernel skips prefix tiles outside every row's window.
  Windowed prompt tiles give up the mask-free FULL_TILES pass (no tile is whole for every row).
- SOFT_CAP (Gemma 2's tanh cap on the scores; 0: none): s -> cap * tanh(s / cap), before masking, in log2 units.
- KEY_LIMITS (unified kernel, prompt steps of Gemma 3 with images): each row sees keys up to its query's limit, read
  from `key_limits` (>= its position: an image token sees its whole image), instead of up to its position; the key
  walk ends at the tile's largest limit, and a window still counts back from the row's own position.

Every kernel has a float64 torch reference (`*_ref`) beside it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.backend import KV_FP8
from pagedllm.kernels import dot_precision, pdl_options, pdl_prologue, tile_dot


@triton.jit
def _find_request(query_start_loc, num_reqs, tile_idx, BLOCK_Q: tl.constexpr):
    """Largest r with query_start_loc[r] // BLOCK_Q + r <= tile_idx (that key is nondecreasing in r)."""
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_reqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        go_right = tl.load(query_start_loc + mid) // BLOCK_Q + mid <= tile_idx
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    return lo


FULL_TILES = tl.constexpr(0)
KEY_RANGE = tl.constexpr(1)
CAUSAL = tl.constexpr(2)


@triton.jit
def _attend_tiles(
    q, acc, m_i, l_i, k_cache, bt_row, kvh, q_pos, q_lim, kv_start, kv_end, qk_scale,
    stride_kv, stride_kb, stride_ko, stride_kh,
    HEAD_D: tl.constexpr, HEAD_D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, MASK: tl.constexpr, WINDOW: tl.constexpr = 0, SOFT_CAP: tl.constexpr = 0.0,
):
    """Online-softmax accumulation over keys [kv_start, kv_end); qk_scale = scale * log2(e).
    MASK: FULL_TILES (whole tiles every row sees: no masks to compute), KEY_RANGE (keys past kv_end
    hidden) or CAUSAL (also keys after the row's last visible key q_lim, its position q_pos but with key limits,
    and with WINDOW keys at or before q_pos - WINDOW).
    SOFT_CAP: scores capped by tanh (see the module docstring).
    V sits stride_kv elements after K, so one pointer tensor (the costly part, in registers) serves both."""
    d = tl.arange(0, HEAD_D_PAD)
    d_ok = d < HEAD_D
    n = tl.arange(0, TILE_N)
    for start in range(kv_start, kv_end, TILE_N):
        k_idx = start + n
        if MASK == FULL_TILES:
            blk = tl.load(bt_row + k_idx // BLOCK_SIZE).to(tl.int64)
            kv_mask = d_ok[None, :]
        else:
            k_ok = k_idx < kv_end
            blk = tl.load(bt_row + k_idx // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
            kv_mask = k_ok[:, None] & d_ok[None, :]
        k_ptrs = k_cache + (blk * stride_kb + (k_idx % BLOCK_SIZE) * stride_ko + kvh * stride_kh)[:, None] + d[None, :]
        if MASK == FULL_TILES and HEAD_D == HEAD_D_PAD:
            k = tl.load(k_ptrs)
            v = tl.load(k_ptrs + stride_kv)
        else:
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(k_ptrs + stride_kv, mask=kv_mask, other=0.0)
        if k_cache.dtype.element_ty == tl.float8e4nv:  # unscaled: the scales are applied outside the loop
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        s = tile_dot(q, tl.trans(k), PREC, UPCAST) * qk_scale  # scaled in fp32: pre-scaling bf16 q would round
        if SOFT_CAP > 0:  # s is in log2 units: cap * tanh(raw / cap) * log2(e) == c * tanh(s / c), c = cap * log2(e)
            s = (2.0 * tl.sigmoid(s * (2.0 / (SOFT_CAP * 1.4426950408889634))) - 1.0) * (SOFT_CAP * 1.4426950408889634)
        if MASK == CAUSAL and WINDOW > 0:
            visible = (k_idx[None, :] <= q_lim[:, None]) & (k_idx[None, :] > q_pos[:, None] - WINDOW)
            s = tl.where(visible & k_ok[None, :], s, float("-inf"))
        elif MASK == CAUSAL:
            s = tl.where((k_idx[None, :] <= q_lim[:, None]) & k_ok[None, :], s, float("-inf"))
        elif MASK == KEY_RANGE:
            s = tl.where(k_ok[None, :] & (q_pos[:, None] >= 0), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    return acc, m_i, l_i


# Runtime ints that change from step to step are not specialised on (Triton would otherwise compile
# a variant per value class: == 1, divisible by 16, other), so no step waits for a compile.
@triton.jit(do_not_specialize=["num_reqs", "stride_bt", "prefix_splits"])
def _unified_attention_kernel(
    q_ptr, kv_cache, out_ptr, block_tables, seq_lens, query_start_loc,
    common_prefix, part_m, part_l, part_acc, prefix_splits,
    num_reqs, qk_scale, v_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kv, stride_kb, stride_ko, stride_kh, stride_bt,
    QPK: tl.constexpr, HEAD_D: tl.constexpr, HEAD_D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, AFTER_PREFIX: tl.constexpr, USE_PDL: tl.constexpr,
    WINDOW: tl.constexpr = 0, SOFT_CAP: tl.constexpr = 0.0, key_limits=None, KEY_LIMITS: tl.constexpr = False,
):
    """AFTER_PREFIX (decode-only batches): the first common_prefix[0] keys were attended by the
    shared-prefix kernel, whose prefix_splits partials per row seed the softmax. KEY_LIMITS: key_limits[t] is
    flat query t's last visible key."""
    pdl_prologue(USE_PDL)
    tile_idx = tl.program_id(0)
    kvh = tl.program_id(1)
    req = _find_request(query_start_loc, num_reqs, tile_idx, BLOCK_Q)
    q_start = tl.load(query_start_loc + req)
    q_len = tl.load(query_start_loc + req + 1) - q_start
    q_off = (tile_idx - q_start // BLOCK_Q - req) * BLOCK_Q
    if q_off >= q_len:
        return
    seq_len = tl.load(seq_lens + req)
    ctx_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    row_q = q_off + rows // QPK  # query index within the request
    row_h = kvh * QPK + rows % QPK
    row_ok = (rows < BLOCK_Q * QPK) & (row_q < q_len)
    d = tl.arange(0, HEAD_D_PAD)
    io_mask = row_ok[:, None] & (d < HEAD_D)[None, :]
    q_tok = q_start + row_q
    q = tl.load(q_ptr + q_tok[:, None] * stride_qt + row_h[:, None] * stride_qh + d[None, :], mask=io_mask, other=0.0)

    acc = tl.zeros([BLOCK_M, HEAD_D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Keys up to the tile's last query position; padded rows see them all, harmlessly (never stored).
    kv_end = tl.minimum(ctx_len + q_off + BLOCK_Q, seq_len)
    kv_full = 0
    bt_row = block_tables + req * stride_bt
    q_pos = ctx_len + row_q
    q_lim = q_pos
    if KEY_LIMITS:  # limits >= positions: the walk goes on to the tile's furthest limit
        q_lim = tl.load(key_limits + q_tok, mask=row_ok, other=0)
        kv_end = tl.minimum(tl.maximum(kv_end, tl.max(q_lim, 0) + 1), seq_len)
    if AFTER_PREFIX:
        kv_full = tl.load(common_prefix)
        acc, m_i, l_i = _merge_partials(
            part_m, part_l, part_acc, q_tok * (QPK * tl.num_programs(1)) + row_h, row_ok, prefix_splits, BLOCK_M, HEAD_D_PAD)
    if WINDOW > 0:
        # No row of the tile sees keys before its first row's window (later rows' windows start later).
        kv_full = tl.maximum(kv_full, ctx_len + q_off - (WINDOW - 1))
    elif BLOCK_Q > 1:
        # Prompt tiles: every row sees the keys up to the first row's position, so those whole tiles
        # go without masks (-10 % time for 32 prompts of 512 tokens on an H200). Decode tiles keep one
        # loop: a second pipelined loop costs them more than the masks (+3 % at 256 x 600).
        kv_full = tl.minimum((ctx_len + q_off + 1) // TILE_N * TILE_N, kv_end)
        acc, m_i, l_i = _attend_tiles(
            q, acc, m_i, l_i, kv_cache, bt_row, kvh, q_pos, q_lim, 0, kv_full, qk_scale, stride_kv, stride_kb,
            stride_ko, stride_kh, HEAD_D, HEAD_D_PAD, BLOCK_SIZE, TILE_N, PREC, UPCAST, FULL_TILES, 0, SOFT_CAP,
        )
    acc, m_i, l_i = _attend_tiles(
        q, acc, m_i, l_i, kv_cache, bt_row, kvh, q_pos, q_lim, kv_full, kv_end, qk_scale,
        stride_kv, stride_kb, stride_ko, stride_kh, HEAD_D, HEAD_D_PAD, BLOCK_SIZE, TILE_N, PREC, UPCAST, CAUSAL,
        WINDOW, SOFT_CAP,
    )
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if kv_cache.dtype.element_ty == tl.float8e4nv:
        out = out * v_scale
    tl.store(out_ptr + q_tok[:, None] * stride_ot + row_h[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def _cache_strides(kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """(K->V, block, offset, head) strides of a [2, num_blocks, block_size, Hkv, D] cache."""
    assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2 and kv_cache.stride(-1) == 1
    return kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3)


def _qk_scale(kv_cache: torch.Tensor, scale: float, k_scale: float, v_scale: float) -> float:
    """The softmax scale with k_scale folded in, in log2 units (the kernels use exp2). Only float8 caches have scales."""
    assert kv_cache.dtype == KV_FP8 or k_scale == v_scale == 1.0, "KV scales apply to a float8 cache only"
    return scale * k_scale * 1.4426950408889634


def _score_options(sliding_window: int | None, soft_cap: float | None) -> dict[str, int | float]:
    """The kernels' WINDOW / SOFT_CAP constants; left at their defaults when off, so those variants compile as
    they did before the options existed."""
    options: dict[str, int | float] = {}
    if sliding_window is not None:
        assert sliding_window > 0
        options["WINDOW"] = int(sliding_window)
    if soft_cap is not None:
        assert soft_cap > 0
        options["SOFT_CAP"] = float(soft_cap)
    return options


def _head_dim_pad(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot wants every dim >= 16


def _default_tile_n(dtype: torch.dtype) -> int:
    """Keys per tile: 64 in 16-bit types, ~10 % more KV-read bandwidth than 32 at decode batches of
    64-512 (benchmarks/attention_bench.py on an H100); float32 stays at 32, where 64 spills on sm_90."""
    return 32 if dtype == torch.float32 else 64


def unified_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor, block_tables: torch.Tensor, max_query_len: int, scale: float,
    block_m: int | None = None, tile_n: int | None = None,
    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    num_warps: int | None = None, num_stages: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
    sliding_window: int | None = None, soft_cap: float | None = None, key_limits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal paged attention of q [T, H, D] over each request's cache; writes and returns out. k_scale, v_scale:
    a float8 cache's dequantization scales; sliding_window, soft_cap: the layer's score options (None: off);
    key_limits: int32 [T], each query's last visible key, >= its position (None: its position).
    block_m, tile_n, num_warps and num_stages override the defaults (benchmarks/attention_bench.py). prefix: (common
    prefix length, partial max, sum, acc) from the shared-prefix kernel (decode-only batches)."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    qpk = num_heads // num_kv_heads
    assert q.stride(-1) == 1 and out.stride(-1) == 1 and qpk * num_kv_heads == num_heads
    num_reqs = seq_lens.shape[0]
    half = q.dtype != torch.float32
    if block_m is None:
        # Decode-only: one token per tile. Otherwise bigger tiles amortise the K/V reads over more queries:
        # 128 rows in 16-bit types, float32 64.
        block_m = 16 if max_query_len * qpk <= 16 else (128 if half else 64)
    block_m = max(block_m, triton.next_power_of_2(qpk))
    block_q = 1 if max_query_len == 1 else block_m // qpk
    # Prompt tiles walk 32 keys at a time with 4 warps: in 16-bit types the best of a sweep over rows, keys,
    # warps and stages at a W1 prefill step on an H200, 1.28x the 64 keys and 8 warps before
    # (benchmarks/attention_bench.py --prompt-sweep; RESULTS.md, session 11).
    tile_n = tile_n or (32 if block_m > 16 else _default_tile_n(q.dtype))
    num_warps = num_warps or (4 if half or block_m <= 16 else 8)
    prec, upcast = dot_precision(q.dtype)
    grid = (num_tokens // block_q + num_reqs, num_kv_heads)
    assert prefix is None or max_query_len == 1
    assert key_limits is None or (prefix is None and key_limits.dtype == torch.int32 and len(key_limits) == num_tokens)
    limits = {} if key_limits is None else {"key_limits": key_limits, "KEY_LIMITS": True}  # else compiled as before
    _unified_attention_kernel[grid](
        q, kv_cache, out, block_tables, seq_lens, query_start_loc,
        *(prefix or (seq_lens,) * 4), 0 if prefix is None else prefix[1].shape[-1],
        num_reqs, _qk_scale(kv_cache, scale, k_scale, v_scale), v_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *_cache_strides(kv_cache), block_tables.stride(0),
        QPK=qpk, HEAD_D=head_dim, HEAD_D_PAD=_head_dim_pad(head_dim), BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=tile_n, PREC=prec, UPCAST=upcast,
        AFTER_PREFIX=prefix is not None, **_score_options(sliding_window, soft_cap), **limits,
        num_warps=num_warps, **({"num_stages": num_stages} if num_stages else {}),
        **pdl_options(q.device),
    )
    return out


@triton.jit
def _merge_partials(
    part_m, part_l, part_acc, row_idx, row_ok, num_splits, BLOCK_M: tl.constexpr, HEAD_D_PAD: tl.constexpr,
):
    """(acc, max, sum) of rows row_idx combined over their num_splits partials (laid out [row, split])."""
    d = tl.arange(0, HEAD_D_PAD)
    acc = tl.zeros([BLOCK_M, HEAD_D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(num_splits):
        off = row_idx * num_splits + s
        m_s = tl.load(part_m + off, mask=row_ok, other=float("-inf"))
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key in any split so far
        alpha, beta = tl.exp2(m_i - m_safe), tl.exp2(m_s - m_safe)
        l_i = l_i * alpha + beta * tl.load(part_l + off, mask=row_ok, other=0.0)
        acc = acc * alpha[:, None] + beta[:, None] * tl.load(part_acc + off[:, None] * HEAD_D_PAD + d[None, :], mask=row_ok[:, None], other=0.0)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["num_tokens"])
def _shared_prefix_kernel(
    q_ptr, kv_cache, block_tables, common_prefix, part_m, part_l, part_acc,
    num_tokens, qk_scale,
    stride_qt, stride_qh, stride_kv, stride_kb, stride_ko, stride_kh,
    QPK: tl.constexpr, HEAD_D: tl.constexpr, HEAD_D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, USE_PDL: tl.constexpr,
    seq_lens=None, WINDOW: tl.constexpr = 0, SOFT_CAP: tl.constexpr = 0.0,
):
    """Rows (token t, query head kvh * QPK + j) of every decode, BLOCK_M per program, against one split
    of the prefix keys [0, common_prefix[0]) in request 0's blocks (every request has the same ones).
    With WINDOW, row t's query sits at seq_lens[t] - 1 and sees only the prefix keys inside its window."""
    pdl_prologue(USE_PDL)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    prefix_len = tl.load(common_prefix)
    part = tl.cdiv(tl.cdiv(prefix_len, num_splits), TILE_N) * TILE_N
    kv_start = tl.minimum(split * part, prefix_len)
    kv_end = tl.minimum(kv_start + part, prefix_len)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // QPK
    head = kvh * QPK + rows % QPK
    row_ok = tok < num_tokens
    d = tl.arange(0, HEAD_D_PAD)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & (d < HEAD_D)[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, HEAD_D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if WINDOW > 0:  # rows' windows differ: masks throughout, from the first key any row of the program sees
        q_pos = tl.load(seq_lens + tok, mask=row_ok, other=0) - 1
        first_seen = tl.min(tl.where(row_ok, q_pos, prefix_len + WINDOW), 0) - (WINDOW - 1)
        acc, m_i, l_i = _attend_tiles(
            q, acc, m_i, l_i, kv_cache, block_tables, kvh, q_pos, q_pos, tl.maximum(kv_start, first_seen), kv_end,
            qk_scale,
            stride_kv, stride_kb, stride_ko, stride_kh, HEAD_D, HEAD_D_PAD, BLOCK_SIZE, TILE_N, PREC, UPCAST, CAUSAL,
            WINDOW, SOFT_CAP,
        )
    else:
        kv_full = kv_start + (kv_end - kv_start) // TILE_N * TILE_N
        acc, m_i, l_i = _attend_tiles(
            q, acc, m_i, l_i, kv_cache, block_tables, kvh, rows, rows, kv_start, kv_full, qk_scale,
            stride_kv, stride_kb, stride_ko, stride_kh, HEAD_D, HEAD_D_PAD, BLOCK_SIZE, TILE_N, PREC, UPCAST, FULL_TILES,
            0, SOFT_CAP,
        )
        acc, m_i, l_i = _attend_tiles(
            q, acc, m_i, l_i, kv_cache, block_tables, kvh, rows, rows, kv_full, kv_end, qk_scale,
            stride_kv, stride_kb, stride_ko, stride_kh, HEAD_D, HEAD_D_PAD, BLOCK_SIZE, TILE_N, PREC, UPCAST, KEY_RANGE,
            0, SOFT_CAP,
        )
    off = (tok * (QPK * tl.num_programs(1)) + head) * num_splits + split
    tl.store(part_m + off, m_i, mask=row_ok)
    tl.store(part_l + off, l_i, mask=row_ok)
    tl.store(part_acc + off[:, None] * HEAD_D_PAD + d[None, :], acc, mask=row_ok[:, None])


MAX_PREFIX_SPLITS = 8


def _partials(rows: int, heads: int, parts: int, d_pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 (max, sum, acc) of each (row, head) over `parts` key ranges, as the merging kernels read them."""
    part_m = torch.empty(rows, heads, parts, dtype=torch.float32, device=device)
    return part_m, torch.empty_like(part_m), torch.empty(rows, heads, parts, d_pad, dtype=torch.float32, device=device)


def shared_prefix_decode(
    q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
    block_tables: torch.Tensor, common_prefix: torch.Tensor, scale: float, num_sms: int, num_splits: int | None = None,
    k_scale: float = 1.0, v_scale: float = 1.0, sliding_window: int | None = None, soft_cap: float | None = None,
) -> torch.Tensor:
    """Decode-only attention (token r belongs to request r) whose requests all hold the same first
    common_prefix[0] keys (whole blocks, shorter than every context) at the start of their block
    tables: the prefix once for all rows, then each request's own keys. Writes and returns out."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    qpk = num_heads // num_kv_heads
    assert q.stride(-1) == 1 and out.stride(-1) == 1
    tile_n = _default_tile_n(q.dtype)
    block_m = 64 if q.dtype == torch.float32 else 128
    row_tiles = triton.cdiv(num_tokens * qpk, block_m)
    if num_splits is None:  # enough programs for one wave over the SMs
        num_splits = max(1, min(MAX_PREFIX_SPLITS, triton.cdiv(num_sms, row_tiles * num_kv_heads)))
    d_pad = _head_dim_pad(head_dim)
    part_m, part_l, part_acc = _partials(num_tokens, num_heads, num_splits, d_pad, q.device)
    prec, upcast = dot_precision(q.dtype)
    _shared_prefix_kernel[(row_tiles, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, common_prefix, part_m, part_l, part_acc,
        num_tokens, _qk_scale(kv_cache, scale, k_scale, v_scale),
        q.stride(0), q.stride(1), *_cache_strides(kv_cache),
        QPK=qpk, HEAD_D=head_dim, HEAD_D_PAD=d_pad, BLOCK_SIZE=block_size, BLOCK_M=block_m, TILE_N=tile_n,
        PREC=prec, UPCAST=upcast, num_warps=8, **pdl_options(q.device),
        **({"seq_lens": seq_lens} if sliding_window is not None else {}), **_score_options(sliding_window, soft_cap),
    )
    # Its partials are in unscaled V: the decode kernel applies v_scale to the merged result.
    return unified_attention(q, kv_cache, out, query_start_loc, seq_lens, block_tables, 1, scale,
                             prefix=(common_prefix, part_m, part_l, part_acc), k_scale=k_scale, v_scale=v_scale,
                             sliding_window=sliding_window, soft_cap=soft_cap)


SPLIT_KV_PARTS = 16  # partitions per sequence at most (1 x 8 KV heads x 16 = ~one wave on 132 SMs)
_MIN_PARTITION = 64  # keys: shorter partitions would cost more in partials and merging than they save


@triton.jit
def _window_start(seq_len, WINDOW: tl.constexpr):
    """The first key a decode (at position seq_len - 1) sees: 0 without a window."""
    if WINDOW > 0:
        return tl.maximum(seq_len - WINDOW, 0)
    else:
        return 0


@triton.jit
def _partition_len(seq_len, num_parts, TILE_N: tl.constexpr, MIN_PARTITION: tl.constexpr):
    """Keys per partition for one sequence: its length over num_parts, in whole tiles, >= MIN_PARTITION."""
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_parts), TILE_N) * TILE_N, MIN_PARTITION)


@triton.jit(do_not_specialize=["num_parts", "stride_bt"])
def _split_kv_decode_kernel(
    q_ptr, kv_cache, block_tables, seq_lens, part_m, part_l, part_acc,
    qk_scale, v_scale, num_parts,
    stride_qt, stride_qh, stride_kv, stride_kb, stride_ko, stride_kh, stride_bt,
    NUM_HEADS: tl.constexpr, QPK: tl.constexpr, HEAD_D: tl.constexpr, HEAD_D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, MIN_PARTITION: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    USE_PDL: tl.constexpr, WINDOW: tl.constexpr = 0, SOFT_CAP: tl.constexpr = 0.0,
):
    """With WINDOW the partitions split the window's keys, all of which the decode sees: no per-key window mask."""
    pdl_prologue(USE_PDL)
    req = tl.program_id(0)  # decodes come first, so request r's query is token r
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens + req)
    kv_low = _window_start(seq_len, WINDOW)
    partition = _partition_len(seq_len - kv_low, num_parts, TILE_N, MIN_PARTITION)
    kv_start = kv_low + part * partition
    if kv_start >= seq_len:
        return  # the merge kernel ignores partitions past the sequence's end
    rows = tl.arange(0, BLOCK_M)
    row_h = kvh * QPK + rows
    row_ok = rows < QPK
    d = tl.arange(0, HEAD_D_PAD)
    io_mask = row_ok[:, None] & (d < HEAD_D)[None, :]
    q = tl.load(q_ptr + req * stride_qt + row_h[:, None] * stride_qh + d[None, :], mask=io_mask, other=0.0)
    acc = tl.zeros([BLOCK_M, HEAD_D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    kv_end = tl.minimum(kv_start + partition, seq_len)
    acc, m_i, l_i = _attend_tiles(
        q, acc, m_i, l_i, kv_cache, block_tables + req * stride_bt, kvh, rows, rows, kv_start, kv_end, qk_scale,
        stride_kv, stride_kb, stride_ko, stride_kh, HEAD_D, HEAD_D_PAD, BLOCK_SIZE, TILE_N, PREC, UPCAST, KEY_RANGE,
        0, SOFT_CAP,
    )
    if kv_cache.dtype.element_ty == tl.float8e4nv:  # partials are linear in V: the merge needs no scale
        acc = acc * v_scale
    ml_off = (req * NUM_HEADS + row_h) * num_parts + part
    tl.store(part_m + ml_off, m_i, mask=row_ok)
    tl.store(part_l + ml_off, l_i, mask=row_ok)
    tl.store(part_acc + ml_off[:, None] * HEAD_D_PAD + d[None, :], acc, mask=io_mask)


@triton.jit(do_not_specialize=["num_parts"])
def _split_kv_merge_kernel(
    part_m, part_l, part_acc, seq_lens, out_ptr, stride_ot, stride_oh, num_parts,
    NUM_HEADS: tl.constexpr, HEAD_D: tl.constexpr, HEAD_D_PAD: tl.constexpr, TILE_N: tl.constexpr, MIN_PARTITION: tl.constexpr,
    USE_PDL: tl.constexpr, WINDOW: tl.constexpr = 0,
):
    pdl_prologue(USE_PDL)
    req = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens + req)
    span = seq_len - _window_start(seq_len, WINDOW)  # the keys the partitions split
    n_valid = tl.cdiv(span, _partition_len(span, num_parts, TILE_N, MIN_PARTITION))  # later ones were never written
    base = (req * NUM_HEADS + head) * num_parts
    # One partition at a time keeps registers at O(head_dim) however many partitions there are.
    m_max = tl.full([], float("-inf"), dtype=tl.float32)
    for i in range(0, n_valid):
        m_max = tl.maximum(m_max, tl.load(part_m + base + i))
    d = tl.arange(0, HEAD_D_PAD)
    acc = tl.zeros([HEAD_D_PAD], dtype=tl.float32)
    l_sum = tl.zeros([], dtype=tl.float32)
    for i in range(0, n_valid):
        w = tl.exp2(tl.load(part_m + base + i) - m_max)
        l_sum += w * tl.load(part_l + base + i)
        acc += w * tl.load(part_acc + (base + i) * HEAD_D_PAD + d)
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)  # an empty sequence (a CUDA graph's padding row) gets zeros
    tl.store(out_ptr + req * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_D)


def split_kv_decode(
    q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor, seq_lens: torch.Tensor,
    block_tables: torch.Tensor, scale: float, num_parts: int = SPLIT_KV_PARTS, tile_n: int | None = None,
    k_scale: float = 1.0, v_scale: float = 1.0, sliding_window: int | None = None, soft_cap: float | None = None,
) -> torch.Tensor:
    """Decode-only attention (token r belongs to request r) with each sequence split into up to
    `num_parts` pieces of whole tiles; writes and returns out [num_decodes, H, D]."""
    num_decodes, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    qpk = num_heads // num_kv_heads
    assert q.stride(-1) == 1 and out.stride(-1) == 1
    tile_n = tile_n or _default_tile_n(q.dtype)
    assert _MIN_PARTITION % tile_n == 0
    d_pad = _head_dim_pad(head_dim)
    part_m, part_l, part_acc = _partials(num_decodes, num_heads, num_parts, d_pad, q.device)
    prec, upcast = dot_precision(q.dtype)
    _split_kv_decode_kernel[(num_decodes, num_kv_heads, num_parts)](
        q, kv_cache, block_tables, seq_lens, part_m, part_l, part_acc,
        _qk_scale(kv_cache, scale, k_scale, v_scale), v_scale, num_parts,
        q.stride(0), q.stride(1), *_cache_strides(kv_cache), block_tables.stride(0),
        NUM_HEADS=num_heads, QPK=qpk, HEAD_D=head_dim,
        HEAD_D_PAD=d_pad, BLOCK_SIZE=block_size, BLOCK_M=max(16, triton.next_power_of_2(qpk)),
        TILE_N=tile_n, MIN_PARTITION=_MIN_PARTITION, PREC=prec, UPCAST=upcast, **_score_options(sliding_window, soft_cap),
        num_warps=8 if q.dtype == torch.float32 else 4, **pdl_options(q.device),  # fp32 spills at 4
    )
    _split_kv_merge_kernel[(num_decodes, num_heads)](
        part_m, part_l, part_acc, seq_lens, out, out.stride(0), out.stride(1), num_parts,
        NUM_HEADS=num_heads, HEAD_D=head_dim, HEAD_D_PAD=d_pad, TILE_N=tile_n, MIN_PARTITION=_MIN_PARTITION, num_warps=1,
        **pdl_options(q.device), **({"WINDOW": sliding_window} if sliding_window is not None else {}),
    )
    return out


def paged_attention_ref(
    q: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: list[int], seq_lens: list[int],
    block_tables: torch.Tensor, scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
    sliding_window: int | None = None, soft_cap: float | None = None, key_limits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float64 reference: per request, gather K/V through the block table (a float8 cache dequantized with its
    scales), causal softmax attention; the query at p sees keys (p - sliding_window, p], scores capped by tanh.
    key_limits [T]: the query at p sees keys up to key_limits[t] instead of p."""
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    qpk = q.shape[1] // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for r, seq_len in enumerate(seq_lens):
        s, e = query_start_loc[r], query_start_loc[r + 1]
        blocks = block_tables[r, : -(-seq_len // block_size)].long()
        k = kv_cache[0].index_select(0, blocks).flatten(0, 1)[:seq_len].double().repeat_interleave(qpk, 1) * k_scale
        v = kv_cache[1].index_select(0, blocks).flatten(0, 1)[:seq_len].double().repeat_interleave(qpk, 1) * v_scale
        scores = torch.einsum("qhd,khd->hqk", q[s:e].double(), k) * scale
        if soft_cap is not None:
            scores = torch.tanh(scores / soft_cap) * soft_cap
        q_pos = torch.arange(seq_len - (e - s), seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        hidden = k_pos > (q_pos if key_limits is None else key_limits[s:e].to(q_pos))[:, None]
        if sliding_window is not None:
            hidden |= k_pos <= q_pos[:, None] - sliding_window
        scores.masked_fill_(hidden, float("-inf"))
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out
