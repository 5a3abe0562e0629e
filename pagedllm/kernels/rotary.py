"""Rotary position embedding (NeoX / HF rotate-half), applied in place to q and k in fp32.

cos_sin_cache is [max_pos, rot_dim]: cos in the first rot_dim/2 columns, sin in the last. Only the
first rot_dim dims of each head rotate (rot_dim < head_dim is partial rotary); x1 = x[:rot/2],
x2 = x[rot/2:rot]: out1 = x1*cos - x2*sin, out2 = x2*cos + x1*sin. One program per token does
all its q and k heads, so the cos/sin row is loaded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, stride_h, num_heads, cos, sin, HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    mask = (h < num_heads) & (j < HALF)
    p1 = x_ptr + h * stride_h + j
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs, num_q_heads, num_k_heads,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF_PAD)[None, :]
    cos = tl.load(cos_sin_ptr + pos * stride_cs + j, mask=j < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, num_q_heads, cos, sin, HALF, HALF_PAD, BLOCK_HQ)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, num_k_heads, cos, sin, HALF, HALF_PAD, BLOCK_HK)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Rotates q [T, H, D] and k [T, Hkv, D] in place at positions [T]."""
    num_tokens, num_q_heads, head_dim = q.shape
    rot_dim = cos_sin_cache.shape[-1]
    assert rot_dim <= head_dim and rot_dim % 2 == 0 and q.stride(-1) == 1 and k.stride(-1) == 1
    assert cos_sin_cache.stride(-1) == 1
    if num_tokens == 0:
        return
    half = rot_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0), num_q_heads, k.shape[1],
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        num_warps=4,
    )


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-place float32 reference; returns rotated (q, k) in their dtypes."""
    cos, sin = cos_sin_cache[positions.long()].float()[:, None, :].chunk(2, dim=-1)
    half = cos.shape[-1]

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1).to(x.dtype)

    return rot(q), rot(k)
