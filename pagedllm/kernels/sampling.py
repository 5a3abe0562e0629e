"""Sampling kernels: the top-k / top-p / min-p filters as one logit threshold per row, then a draw in one
pass over the logits (the Gumbel-max trick).

argmax_i(l_i / T + g_i), with g_i = -log(-log u_i) independent Gumbel noise, is a draw from
softmax(l / T). So no softmax, no float32 copy of the [B, V] logits and no [B, V] noise tensor are
made (together ~10 passes over B x V float32 values in the torch path): each program reads a slice
of a row once, in its own dtype, draws Philox noise in registers (four uniforms per Philox call),
and keeps its best (score, index); a small torch reduction then picks each row's winner over the
slices. A row with noise scale 0 is a greedy row: the plain argmax of its logits (ties to the lowest
index, as torch.argmax); an all-greedy batch takes a variant that draws no noise (greedy_argmax).
Logits under a row's threshold are left out of its draw.

Each row has its own Philox seed and the counter is the column, so a row's noise depends on its
seed alone, never on the batch around it (seeded requests draw their seed from their own generator).

Thresholds (filter_thresholds; vLLM's order, each filter on the tokens the ones before it kept):
min_p keeps l >= max + T log(min_p), i.e. exp((l - max) / T) >= min_p; top_k keeps l >= the k-th
largest kept value; top_p keeps l >= v*, the first value (descending) at which the kept tokens'
cumulative softmax mass reaches top_p. No sort: one program per row takes the row's max and min in one
pass, then finds the k-th value by counts and v* by masses, searching integer keys whose order is the
float order. Each pass over the row tests _POINTS keys at once (the first pass evenly spaced values,
later ones evenly spaced keys), narrowing the range _POINTS-fold until one key, a value of the row, is
left: on random rows 2-4 passes per filter for bf16 logits, 8-9 for float32 (at most 7 and 12). A row
skips the searches it does not need. Ties with a threshold are all kept (the torch path's sort keeps an
arbitrary part of a tied group), and min_p's bound may differ from the torch path's softmax test by a
rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import uint_to_uniform_float

from pagedllm.kernels import pdl_options, pdl_prologue, sm_count

_BLOCK = 1024  # columns per iteration: four quarters, one per Philox output
_MIN_U = 1e-20  # u = 0 would give g = -inf, and 0 * -inf = NaN in a greedy row
_NO_INDEX = 2147483647
_FILTER_BLOCK = 1024  # columns per tile of a threshold pass
_POINTS = 8  # keys tested per threshold pass: more would mean fewer passes, but each costs two ops per column
_INT_MIN = tl.constexpr(-(1 << 31))


@triton.jit
def _best_of_quarter(best_v, best_i, base, cols, end, bits, inv_t, noise, thresh, MIN_U: tl.constexpr, GREEDY: tl.constexpr):
    ok = cols < end
    x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32)
    ok &= x >= thresh
    if GREEDY:
        score = x
    else:
        u = tl.maximum(uint_to_uniform_float(bits), MIN_U)
        score = x * inv_t - noise * tl.log(-tl.log(u))
    take = ok & (score > best_v)  # strictly: the first of equal scores stays
    return tl.where(take, score, best_v), tl.where(take, cols, best_i)


@triton.jit(do_not_specialize=["stride_row", "vocab", "slice_len", "num_slices"])
def _gumbel_max_kernel(
    logits_ptr, inv_temp_ptr, noise_ptr, seed_ptr, thresh_ptr, best_val_ptr, best_idx_ptr,
    stride_row, vocab, slice_len, num_slices,
    HAS_THRESH: tl.constexpr, GREEDY: tl.constexpr, BLOCK: tl.constexpr, MIN_U: tl.constexpr, NO_INDEX: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0)
    part = tl.program_id(1)
    if GREEDY:  # every row greedy: a plain argmax, no noise drawn (the per-row pointers are unused)
        inv_t, noise, seed = 1.0, 0.0, 0
    else:
        inv_t = tl.load(inv_temp_ptr + row)
        noise = tl.load(noise_ptr + row)
        seed = tl.load(seed_ptr + row)
    if HAS_THRESH:
        thresh = tl.load(thresh_ptr + row)
    else:
        thresh = float("-inf")
    start = part * slice_len
    end = tl.minimum(start + slice_len, vocab)
    QUARTER: tl.constexpr = BLOCK // 4
    best_v = tl.full([QUARTER], float("-inf"), tl.float32)
    best_i = tl.full([QUARTER], NO_INDEX, tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride_row
    lanes = tl.arange(0, QUARTER)
    for off in range(start, end, BLOCK):
        # Column off + j * QUARTER + i takes output j of Philox counter off / 4 + i: one draw per column.
        if GREEDY:
            r0 = lanes.to(tl.uint32)  # never read
            r1, r2, r3 = r0, r0, r0
        else:
            r0, r1, r2, r3 = tl.randint4x(seed, off // 4 + lanes)
        best_v, best_i = _best_of_quarter(best_v, best_i, base, off + lanes, end, r0, inv_t, noise, thresh, MIN_U, GREEDY)
        best_v, best_i = _best_of_quarter(best_v, best_i, base, off + QUARTER + lanes, end, r1, inv_t, noise, thresh, MIN_U, GREEDY)
        best_v, best_i = _best_of_quarter(best_v, best_i, base, off + 2 * QUARTER + lanes, end, r2, inv_t, noise, thresh, MIN_U, GREEDY)
        best_v, best_i = _best_of_quarter(best_v, best_i, base, off + 3 * QUARTER + lanes, end, r3, inv_t, noise, thresh, MIN_U, GREEDY)
    top = tl.max(best_v, 0)
    idx = tl.min(tl.where(best_v == top, best_i, NO_INDEX), 0)
    idx = tl.where(idx == NO_INDEX, start, idx)  # a slice of -inf (or NaN) only: still a column, as torch.argmax
    tl.store(best_val_ptr + row * num_slices + part, top)
    tl.store(best_idx_ptr + row * num_slices + part, idx)


def gumbel_max_sample(
    logits: torch.Tensor, inv_temperature: torch.Tensor, noise: torch.Tensor, seeds: torch.Tensor,
    thresholds: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [B, V] (any float dtype, unit column stride); inv_temperature and noise [B] float32 (noise
    1 for a random row, 0 for a greedy one); seeds [B] int64, each row's Philox seed; thresholds [B]
    float32 or None: logits below a row's threshold are never drawn. Returns ids [B] int64."""
    return _draw(logits, (inv_temperature, noise, seeds), thresholds)


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1) (ties to the lowest index) for logits [B, V] with unit column stride: a small
    batch's row spread over many programs, where torch's reduction gives a row one block (36 us at
    1 x 128,256 on an H200; L1 on the Llama-3-8B shape gains ~40 us per token)."""
    return _draw(logits, None, None)


def _draw(logits: torch.Tensor, rows_args: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
          thresholds: torch.Tensor | None) -> torch.Tensor:
    rows, vocab = logits.shape
    assert logits.stride(1) == 1
    # Enough programs for ~2 waves over the SMs, in slices of whole blocks.
    num_slices = max(1, min(triton.cdiv(vocab, _BLOCK), triton.cdiv(2 * sm_count(logits.device), max(rows, 1))))
    slice_len = triton.cdiv(triton.cdiv(vocab, num_slices), _BLOCK) * _BLOCK
    num_slices = triton.cdiv(vocab, slice_len)
    best_val = torch.empty(rows, num_slices, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(rows, num_slices, dtype=torch.int32, device=logits.device)
    if rows:
        inv_temperature, noise, seeds = rows_args or (best_val, best_val, best_idx)  # greedy: never read
        _gumbel_max_kernel[(rows, num_slices)](
            logits, inv_temperature, noise, seeds, inv_temperature if thresholds is None else thresholds, best_val, best_idx,
            logits.stride(0), vocab, slice_len, num_slices,
            HAS_THRESH=thresholds is not None, GREEDY=rows_args is None, BLOCK=_BLOCK, MIN_U=_MIN_U, NO_INDEX=_NO_INDEX,
            num_warps=4, **pdl_options(logits.device),
        )
    winner = best_val.argmax(dim=1, keepdim=True)  # the first slice holding the row's best score
    return best_idx.gather(1, winner).view(-1).long()


@triton.jit
def _key(x):
    """int64 key of float32 x whose integer order is the float order (-0 and +0 share key 0)."""
    bits = x.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


@triton.jit
def _ceil_key(x, SHIFT: tl.constexpr):
    """The smallest search key k with _value(k) >= x."""
    return (_key(x) + (1 << SHIFT) - 1) >> SHIFT


@triton.jit
def _value(key, SHIFT: tl.constexpr):
    """The float32 of key << SHIFT. SHIFT 16 for bf16 logits: their keys hold only the top 16 bits, so the
    search runs on key >> 16 and l >= _value(k, 16) iff key(l) >> 16 >= k."""
    k = key << SHIFT
    bits = tl.where(k >= 0, k, _INT_MIN - k)  # sign bit | magnitude, as an int32
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _max_and_min(base, vocab, BLOCK: tl.constexpr):
    """A row's max, and its min over finite logits (masked -inf tokens are never drawn, so never counted)."""
    top = tl.full([BLOCK], float("-inf"), tl.float32)
    low = tl.full([BLOCK], float("inf"), tl.float32)
    for off in range(0, vocab, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        top = tl.maximum(top, x)
        low = tl.minimum(low, tl.where(x > float("-inf"), x, float("inf")))
    return tl.max(top, 0), tl.min(low, 0)


@triton.jit
def _search(base, vocab, lo, hi, goal, top, inv_t,
            MASS: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr, POINTS: tl.constexpr):
    """The largest key t in [lo, hi] with f(t) >= goal, where f(t) sums over the row's logits l >= _value(t)
    1 (a count), or with MASS exp((l - top) / T) (goal then a fraction of f(lo)); lo if f(lo) < goal.
    Needs f(hi + 1) < goal. Each pass tests POINTS keys from lo on and keeps those between the last one
    that meets the goal and the next; they are evenly spaced (after the first pass, in key space), so
    the range narrows POINTS-fold."""
    passes = 0
    cols = tl.arange(0, BLOCK)
    points = tl.arange(0, POINTS)
    while lo < hi:
        if passes == 0:  # evenly spaced values: most keys lie near 0, where few logits are
            low = _value(lo, SHIFT)
            keys = _ceil_key(low + (_value(hi, SHIFT) - low) * (points / POINTS), SHIFT)
        else:
            keys = tl.minimum(lo + points.to(tl.int64) * ((hi - lo) // POINTS + 1), hi + 1)
        thresholds = _value(keys, SHIFT)
        # Thresholds along dim 0: each thread holds all of them for its own columns, so each column is
        # loaded (and exp'd) once.
        acc = tl.zeros([POINTS, BLOCK], tl.float32)
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        for off in range(BLOCK, vocab + BLOCK, BLOCK):
            # The next tile's load goes out before this tile's work, which then hides its latency.
            ahead = tl.load(base + off + cols, mask=off + cols < vocab, other=float("-inf")).to(tl.float32)
            if MASS:
                w = tl.exp((x - top) * inv_t)
            else:
                w = tl.full([BLOCK], 1.0, tl.float32)
            acc += tl.where(x[None, :] >= thresholds[:, None], w[None, :], 0.0)
            x = ahead
        f = tl.sum(acc, 1)
        if MASS:
            goal = tl.where(passes == 0, goal * tl.max(f, 0), goal)  # max = f(lo): f never grows with t
        passes += 1
        ok = f >= goal
        hi = tl.min(tl.where(ok, hi, keys - 1), 0)  # below the first key that fails; lo - 1 if all fail
        lo = tl.max(tl.where(ok, keys, lo), 0)
    return lo


@triton.jit(do_not_specialize=["stride_row", "vocab"])
def _filter_threshold_kernel(
    logits_ptr, inv_temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, thresh_ptr, stride_row, vocab,
    SHIFT: tl.constexpr, BLOCK: tl.constexpr, POINTS: tl.constexpr,
):
    row = tl.program_id(0)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    thresh = tl.full([], float("-inf"), tl.float32)
    if (top_k > 0) | (top_p < 1.0) | (min_p > 0.0):
        inv_t = tl.load(inv_temp_ptr + row)
        base = logits_ptr + row.to(tl.int64) * stride_row
        top, floor = _max_and_min(base, vocab, BLOCK)
        if min_p > 0.0:
            floor = tl.maximum(floor, top + tl.log(min_p) / inv_t)  # exp((l - top) / T) >= min_p
        lo = _ceil_key(floor, SHIFT)
        hi = _key(top) >> SHIFT
        if top_k > 0:
            lo = _search(base, vocab, lo, hi, top_k.to(tl.float32), top, inv_t, False, SHIFT, BLOCK, POINTS)
        if top_p < 1.0:
            lo = _search(base, vocab, lo, hi, top_p, top, inv_t, True, SHIFT, BLOCK, POINTS)
        thresh = _value(lo, SHIFT)
    tl.store(thresh_ptr + row, thresh)


def filter_thresholds(
    logits: torch.Tensor, inv_temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """logits [B, V] (any float dtype, unit column stride); inv_temperature, top_p, min_p [B] float32 and top_k [B]
    int32, with neutral values for rows without a filter (top_k 0, top_p 1, min_p 0). Returns [B] float32: each
    row keeps the logits >= its threshold (-inf for a row without filters)."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1
    thresholds = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _filter_threshold_kernel[(rows,)](
            logits, inv_temperature, top_k, top_p, min_p, thresholds, logits.stride(0), vocab,
            SHIFT=16 if logits.dtype == torch.bfloat16 else 0, BLOCK=_FILTER_BLOCK, POINTS=_POINTS, num_warps=8,
        )
    return thresholds
