"""Multi-LoRA products for a batch whose tokens belong to different adapters: out[t] (+)= x[t] @ W[slot(t)].T,
W [slots, N, K]. Two kernels: segmented (Punica's SGMV) for eager steps, and row-indexed (BGMV) for CUDA graphs.

The host sorts the step's tokens by slot once (`LoRASegments`: the token order, and per slot its first sorted row
and count), so program (segment, M tile, N tile) gathers BLOCK_M of one adapter's token rows and reads only that
adapter's weight tiles: a prefill chunk reuses each tile over its rows, and a decode batch's tokens of one adapter
share theirs. The same kernel runs the shrink (x @ A.T into a float32 [T, parts * R] buffer) and the expand (that
buffer @ B.T added into the layer's output). Base-model tokens (slot -1) are in no segment. The torch reference is
pagedllm/lora/layers.py's `lora_delta_ref` (the CPU path, free of triton).

Row-indexed (`bgmv_delta`): program (token, N tile) reads its token's slot on the device and skips base tokens, so it
needs nothing from the host: a decode CUDA graph captures it with the slots in a persistent buffer, and every replay
serves whatever adapters the step's rows use. Each row reads its adapter's tiles itself, which suits decode batches
(one token per request); eager prefills keep the segmented kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from pagedllm.kernels import dot_precision, interpreting, tile_dot


@dataclass
class LoRASegments:
    """One step's tokens grouped by adapter slot: `order` the token indices sorted by slot (base tokens left out),
    and per segment its slot, first position in `order` and length."""

    order: torch.Tensor  # [S] int64
    slot: torch.Tensor  # [G] int64
    start: torch.Tensor  # [G] int64
    length: torch.Tensor  # [G] int64
    max_length: int

    @classmethod
    def build(cls, token_slots: np.ndarray, device: torch.device) -> LoRASegments | None:
        adapted = np.flatnonzero(token_slots >= 0)
        if adapted.size == 0:
            return None
        order = adapted[np.argsort(token_slots[adapted], kind="stable")]
        slots, starts, lengths = np.unique(token_slots[order], return_index=True, return_counts=True)
        # One pinned host array, copied without waiting: a pageable copy would stall the host until the device is idle
        host = torch.from_numpy(np.concatenate([order, slots, starts, lengths]).astype(np.int64))
        pinned = device.type == "cuda"
        host = host.pin_memory() if pinned else host
        order_d, slots_d, starts_d, lengths_d = host.to(device, non_blocking=pinned).split(
            [order.size, slots.size, starts.size, lengths.size])
        return cls(order_d, slots_d, starts_d, lengths_d, int(lengths.max()))


@triton.jit
def _sgmv_kernel(x_ptr, w_ptr, out_ptr, order_ptr, slot_ptr, start_ptr, length_ptr, N, K, stride_x, stride_ws,
                 stride_wn, stride_o, ADD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    segment, m_tile, n_tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(length_ptr + segment)
    if m_tile * BLOCK_M >= length:
        return
    first, slot = tl.load(start_ptr + segment), tl.load(slot_ptr + segment)
    m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    ok_m = m < length
    tokens = tl.load(order_ptr + first + m, mask=ok_m, other=0)
    n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_n = n < N
    k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + slot * stride_ws
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ok_k = k0 + k < K
        a = tl.load(x_ptr + tokens[:, None] * stride_x + (k0 + k)[None, :], mask=ok_m[:, None] & ok_k[None, :],
                    other=0.0)
        w = tl.load(w_base + n[None, :] * stride_wn + (k0 + k)[:, None], mask=ok_k[:, None] & ok_n[None, :], other=0.0)
        acc = acc + tile_dot(a.to(w.dtype), w, PREC, UPCAST)
    ptrs = out_ptr + tokens[:, None] * stride_o + n[None, :]
    mask = ok_m[:, None] & ok_n[None, :]
    if ADD:
        acc = acc + tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sgmv(x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, segments: LoRASegments, add: bool) -> torch.Tensor:
    """out[t] = (out[t] +) x[t] @ weights[slot(t)].T for every adapted token t; x [T, K], weights [slots, N, K]."""
    n, k = weights.shape[1], weights.shape[2]
    assert x.stride(1) == 1 and weights.stride(2) == 1 and out.stride(1) == 1 and x.shape[1] == k
    block_m = 16 if segments.max_length <= 16 else 64
    block_n = max(16, min(128, triton.next_power_of_2(n)))
    block_k = max(16, min(64, triton.next_power_of_2(k)))
    prec, upcast = dot_precision(weights.dtype)
    grid = (segments.slot.shape[0], triton.cdiv(segments.max_length, block_m), triton.cdiv(n, block_n))
    _sgmv_kernel[grid](x, weights, out, segments.order, segments.slot, segments.start, segments.length, n, k,
                       x.stride(0), weights.stride(0), weights.stride(1), out.stride(0), ADD=add, BLOCK_M=block_m,
                       BLOCK_N=block_n, BLOCK_K=block_k, PREC=prec, UPCAST=upcast or interpreting(), num_warps=4)
    return out


@triton.jit
def _bgmv_kernel(x_ptr, w_ptr, out_ptr, slots_ptr, N, K, K_PER_PROGRAM, stride_x, stride_xs, stride_ws, stride_wn,
                 stride_o, stride_os, ADD: tl.constexpr, X_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Program (token, N tile, K split): out[split, token, n tile] (+)= x[token, split's K] . w[slot, n tile]; x is
    the sum of X_SPLITS partial rows (a split shrink's output, summed as the expand reads it)."""
    token, n_tile, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slots_ptr + token)
    if slot >= 0:
        n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        ok_n = n < N
        k = tl.arange(0, BLOCK_K)
        w_base = w_ptr + slot * stride_ws
        acc = tl.zeros([BLOCK_N], tl.float32)
        k_start = split * K_PER_PROGRAM
        k_end = tl.minimum(k_start + K_PER_PROGRAM, K)
        for k0 in range(k_start, k_end, BLOCK_K):
            ok_k = k0 + k < k_end
            a = tl.zeros([BLOCK_K], tl.float32)
            for s in range(X_SPLITS):
                a += tl.load(x_ptr + s * stride_xs + token * stride_x + k0 + k, mask=ok_k, other=0.0).to(tl.float32)
            w = tl.load(w_base + n[:, None] * stride_wn + (k0 + k)[None, :], mask=ok_n[:, None] & ok_k[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(w * a[None, :], axis=1)
        ptrs = out_ptr + split * stride_os + token * stride_o + n
        if ADD:
            acc += tl.load(ptrs, mask=ok_n, other=0.0).to(tl.float32)
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok_n)


_K_PER_PROGRAM = 512  # the shrink's K (the hidden size) is long and its N (parts x rank) short: split K over programs


def _bgmv(x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, token_slots: torch.Tensor, add: bool,
          k_per_program: int, splits: int, x_splits: int) -> None:
    n, k = weights.shape[1], weights.shape[2]
    tokens = token_slots.shape[0]
    block_n = max(16, min(64, triton.next_power_of_2(n)))
    block_k = max(16, min(128, triton.next_power_of_2(k)))
    # The kernel steps rows by their width: x, out (and the partials) must be contiguous.
    assert x.is_contiguous() and out.is_contiguous() and weights.stride(2) == 1 and x.shape[-1] == k
    _bgmv_kernel[(tokens, triton.cdiv(n, block_n), splits)](
        x, weights, out, token_slots, n, k, k_per_program, x.shape[-1], tokens * x.shape[-1], weights.stride(0),
        weights.stride(1), out.shape[-1], tokens * out.shape[-1], ADD=add, X_SPLITS=x_splits, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=4)


def bgmv_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
               token_slots: torch.Tensor) -> torch.Tensor:
    """Row-indexed out[t] += (x[t] @ A[slot].T) @ B[slot].T: the shrink split over K into float32 partials (no
    zeroing, no atomics: base rows write nothing and are never read), summed by the expand as it reads them."""
    k = a.shape[2]
    splits = triton.cdiv(k, _K_PER_PROGRAM)
    partials = torch.empty(splits, x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    _bgmv(x.contiguous(), a, partials, token_slots, False, _K_PER_PROGRAM, splits, 1)
    _bgmv(partials, b, out, token_slots, True, a.shape[1], 1, splits)
    return out


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
               segments: LoRASegments | None, token_slots: torch.Tensor | None = None) -> torch.Tensor:
    """out += (x @ A[slot].T) @ B[slot].T per adapted token: the shrink into float32, then the expand added; by
    segments when given, else row-indexed by token_slots (CUDA graphs)."""
    if segments is None:
        assert token_slots is not None
        return bgmv_delta(x, a, b, out, token_slots)
    inter = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    sgmv(x, a, inter, segments, add=False)
    return sgmv(inter, b, out, segments, add=True)
