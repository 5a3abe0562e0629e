"""Everything between the QKV projection and attention, in one kernel: the optional per-head
RMSNorm of q and k (Qwen3), rotary embedding of q and k, and the write of k and v into the paged
KV cache. Unfused that is four or five launches per layer; at decode batch sizes each is a few
microseconds of mostly idle GPU.

qkv is the projection's output [T, (H + 2 Hkv) * D]. q is rotated in place there (attention reads
it as a view), or into a given q_out [T, H, D] (a piecewise CUDA graph's persistent buffer); k and v
go only to the cache, at slot s (block s // block_size, offset
s % block_size; slot -1 writes nothing). Rotary is NeoX / HF rotate-half over the first rot_dim
dims of each head (cos_sin_cache [max_pos, rot_dim]: cos then sin); dims past rot_dim pass through.
Numerics follow the unfused path: the norm rounds to the input dtype before and after its weight,
the rotation runs in fp32 and rounds once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.backend import KV_FP8
from pagedllm.attention.torch_backend import write_kv
from pagedllm.kernels import interpreting, pdl_options, pdl_prologue, to_fp8


@triton.jit
def _norm_rope(ptr, num_heads, cos, sin, w_ptr, eps, HAS_NORM: tl.constexpr, HEAD_D: tl.constexpr,
               HALF: tl.constexpr, HALF_PAD: tl.constexpr, REST: tl.constexpr, REST_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    """Loads heads [BLOCK_H, D] at ptr (contiguous), returns (rotated first half, second half, rest) in fp32."""
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    r = tl.arange(0, REST_PAD)[None, :]
    hm = h < num_heads
    mj, mr = hm & (j < HALF), hm & (r < REST)
    dtype = ptr.dtype.element_ty
    x1 = tl.load(ptr + h * HEAD_D + j, mask=mj, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + h * HEAD_D + HALF + j, mask=mj, other=0.0).to(tl.float32)
    x3 = tl.load(ptr + h * HEAD_D + 2 * HALF + r, mask=mr, other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1) + tl.sum(x3 * x3, 1)) / HEAD_D + eps)[:, None]
        w1 = tl.load(w_ptr + j, mask=j < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
        w3 = tl.load(w_ptr + 2 * HALF + r, mask=r < REST, other=0.0).to(tl.float32)
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
        x3 = ((x3 * rstd).to(dtype).to(tl.float32) * w3).to(dtype).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin, x3


@triton.jit
def _to_cache(x, dtype, cache_ptr, inv_scale, EXACT_FP8: tl.constexpr):
    """x rounded to the model's dtype (as the unfused path stores it), then to the cache's: a float8 cache (known from
    the pointer's type at compile time) holds x / scale, as x * inv_scale in fp32, saturated at +-448."""
    x = x.to(dtype)
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        return to_fp8(tl.minimum(tl.maximum(x.to(tl.float32) * inv_scale, -448.0), 448.0), EXACT_FP8)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _rope_kv_write_kernel(
    qkv_ptr, q_out_ptr, pos_ptr, cos_sin_ptr, q_w_ptr, k_w_ptr, k_cache, v_cache, slot_ptr,
    stride_t, stride_qo, stride_cs, stride_cb, stride_co, eps, num_heads, num_kv_heads, k_inv_scale, v_inv_scale,
    HAS_NORM: tl.constexpr, HEAD_D: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    REST: tl.constexpr, REST_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, EXACT_FP8: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_prologue(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF_PAD)[None, :]
    cos = tl.load(cos_sin_ptr + pos * stride_cs + j, mask=j < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
    r = tl.arange(0, REST_PAD)[None, :]
    q_ptr = qkv_ptr + t * stride_t
    dtype = q_ptr.dtype.element_ty

    h = tl.arange(0, BLOCK_HQ)[:, None]
    o1, o2, o3 = _norm_rope(q_ptr, num_heads, cos, sin, q_w_ptr, eps, HAS_NORM, HEAD_D, HALF, HALF_PAD, REST, REST_PAD, BLOCK_HQ)
    mj, mr = (h < num_heads) & (j < HALF), (h < num_heads) & (r < REST)
    qo_ptr = q_out_ptr + t * stride_qo
    tl.store(qo_ptr + h * HEAD_D + j, o1.to(dtype), mask=mj)
    tl.store(qo_ptr + h * HEAD_D + HALF + j, o2.to(dtype), mask=mj)
    tl.store(qo_ptr + h * HEAD_D + 2 * HALF + r, o3.to(dtype), mask=mr)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        # New names in this branch: Triton wants a variable's shape fixed across an if.
        k_ptr = q_ptr + num_heads * HEAD_D
        hk = tl.arange(0, BLOCK_HK)[:, None]
        k1, k2, k3 = _norm_rope(k_ptr, num_kv_heads, cos, sin, k_w_ptr, eps, HAS_NORM, HEAD_D, HALF, HALF_PAD, REST, REST_PAD, BLOCK_HK)
        mkj, mkr = (hk < num_kv_heads) & (j < HALF), (hk < num_kv_heads) & (r < REST)
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_co + hk * HEAD_D
        tl.store(k_cache + dst + j, _to_cache(k1, dtype, k_cache, k_inv_scale, EXACT_FP8), mask=mkj)
        tl.store(k_cache + dst + HALF + j, _to_cache(k2, dtype, k_cache, k_inv_scale, EXACT_FP8), mask=mkj)
        tl.store(k_cache + dst + 2 * HALF + r, _to_cache(k3, dtype, k_cache, k_inv_scale, EXACT_FP8), mask=mkr)
        d = tl.arange(0, D_PAD)[None, :]
        mv = (hk < num_kv_heads) & (d < HEAD_D)
        v = tl.load(k_ptr + num_kv_heads * HEAD_D + hk * HEAD_D + d, mask=mv)
        tl.store(v_cache + dst + d, _to_cache(v, dtype, v_cache, v_inv_scale, EXACT_FP8), mask=mv)


def rope_kv_write(
    qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
    q_out: torch.Tensor | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """qkv [T, (H + 2 Hkv) * D] -> q [T, H, D] (normed and rotated: in place, a view of qkv, or into q_out);
    k and v (normed and rotated k) are written to kv_cache [2, num_blocks, block_size, Hkv, D] at slot_mapping.
    A float8 cache stores k / k_scale and v / v_scale (quantize_fp8); other caches take no scales."""
    num_tokens = qkv.shape[0]
    if q_out is None:
        q_out = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    assert q_out.shape == (num_tokens, num_heads, head_dim) and q_out.stride(1) == head_dim and q_out.stride(2) == 1
    rot_dim = cos_sin_cache.shape[-1]
    assert qkv.stride(-1) == 1 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim
    assert rot_dim <= head_dim and rot_dim % 2 == 0 and cos_sin_cache.stride(-1) == 1
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    assert k_cache.stride(2) == head_dim and k_cache.stride(3) == 1
    has_norm = q_norm_weight is not None
    assert has_norm == (k_norm_weight is not None)
    assert kv_cache.dtype == KV_FP8 or k_scale == v_scale == 1.0
    if num_tokens:
        half, rest = rot_dim // 2, head_dim - rot_dim
        _rope_kv_write_kernel[(num_tokens,)](
            qkv, q_out, positions, cos_sin_cache, q_norm_weight if has_norm else qkv, k_norm_weight if has_norm else qkv,
            k_cache, v_cache, slot_mapping,
            qkv.stride(0), q_out.stride(0), cos_sin_cache.stride(0), k_cache.stride(0), k_cache.stride(1), eps, num_heads, num_kv_heads,
            1.0 / k_scale, 1.0 / v_scale,
            HAS_NORM=has_norm, HEAD_D=head_dim, HALF=half, HALF_PAD=triton.next_power_of_2(half),
            REST=rest, REST_PAD=triton.next_power_of_2(max(rest, 1)), D_PAD=triton.next_power_of_2(head_dim),
            BLOCK_SIZE=k_cache.shape[1], BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HK=triton.next_power_of_2(num_kv_heads),
            EXACT_FP8=interpreting(), num_warps=4, **pdl_options(qkv.device),
        )
    return q_out


def rope_kv_write_ref(
    qkv: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
    kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """Step by step in torch (norm in fp32 with the dtype roundings, rotation in fp32): returns q, fills kv_cache."""
    from pagedllm.kernels.norm import rms_norm_ref

    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k, v = q.reshape(-1, num_heads, head_dim), k.reshape(-1, num_kv_heads, head_dim), v.reshape(-1, num_kv_heads, head_dim)
    if q_norm_weight is not None and k_norm_weight is not None:
        q, k = rms_norm_ref(q, q_norm_weight, eps)[0], rms_norm_ref(k, k_norm_weight, eps)[0]
    cos, sin = cos_sin_cache[positions.long()].float()[:, None, :].chunk(2, dim=-1)
    half = cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1).to(x.dtype)

    q, k = rotate(q), rotate(k)
    write_kv(k, v, kv_cache, slot_mapping, k_scale, v_scale)
    return q
