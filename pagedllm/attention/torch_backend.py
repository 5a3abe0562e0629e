"""Attention in plain PyTorch: the CPU backend and the reference for the Triton one.

Keys and values are read through the block tables at every step (a gather into a temporary);
nothing contiguous is kept per request between steps. Decodes are batched into one SDPA call;
each prefill chunk gets its own call with a causal mask offset by its cached context. A float8 cache's
gathered blocks are widened to the query's dtype; k_scale goes into the softmax scale, v_scale onto the output.
A sliding window (Mistral, Gemma's local layers) narrows each query's mask to its last `window` keys; a soft cap
(Gemma 2) squashes the scores before the mask, which SDPA cannot do, so those calls take an explicit softmax.
Per-query key limits (Gemma 3's images) replace the causal bound of a prefill chunk's mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedllm.attention.backend import KV_FP8, AttentionMetadata, quantize_fp8


def write_kv(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Stores key/value [T, Hkv, D] at their slots of kv_cache [2, num_blocks, block_size, Hkv, D]; slot -1
    (padding) stores nothing; a float8 cache takes key / k_scale and value / v_scale. The CPU path (on CUDA the
    attention layer writes through a fused kernel)."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    if kv_cache.dtype == KV_FP8:  # copied as bytes: CPU torch has no index_copy_ for float8
        key, value = quantize_fp8(key, k_scale).view(torch.uint8), quantize_fp8(value, v_scale).view(torch.uint8)
        kv_cache = kv_cache.view(torch.uint8)
    flat = kv_cache.view(2, -1, *kv_cache.shape[-2:])  # [2, num_slots, Hkv, D]
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


class TorchAttentionBackend:
    name = "torch"
    shared_prefix_min = None

    def takes_shared_prefix(self, num_reqs: int, num_kv_heads: int, device: torch.device) -> bool:
        return False

    def forward(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float, out: torch.Tensor | None = None,
        k_scale: float = 1.0, v_scale: float = 1.0, sliding_window: int | None = None, soft_cap: float | None = None,
    ) -> torch.Tensor:
        out = torch.empty_like(query) if out is None else out
        scale *= k_scale
        n = meta.num_decodes
        if n:
            out[:n] = self._decode(query[:n], kv_cache, meta, scale, sliding_window, soft_cap)
        starts, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
        for i in range(n, meta.num_reqs):
            q = query[starts[i] : starts[i + 1]]
            k, v = _gather(kv_cache, meta.block_tables[i : i + 1], lens[i], q.dtype)
            if meta.key_limits is None:
                mask = _causal_mask(q.shape[0], lens[i], q.device, sliding_window)
            else:
                mask = _limited_mask(meta.key_limits[starts[i] : starts[i + 1]], lens[i], sliding_window)
            out[starts[i] : starts[i + 1]] = _attend(q.unsqueeze(0), k, v, mask, scale, soft_cap)[0]
        if v_scale != 1.0:
            out.mul_(v_scale)
        return out

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                sliding_window: int | None, soft_cap: float | None) -> torch.Tensor:
        n = meta.num_decodes
        seq_lens = meta.seq_lens[:n]
        max_len = max(meta.seq_lens_cpu[:n])
        k, v = _gather(kv_cache, meta.block_tables[:n], max_len, query.dtype)
        mask = None
        keys = torch.arange(max_len, device=query.device)[None, :]
        if min(meta.seq_lens_cpu[:n]) != max_len:  # pad keys past each sequence's end
            mask = keys < seq_lens[:, None].to(torch.long)
        if sliding_window is not None and max_len > sliding_window:  # the query at seq_len - 1 sees the last W keys
            in_window = keys >= seq_lens[:, None].to(torch.long) - sliding_window
            mask = in_window if mask is None else mask & in_window
        return _attend(query.unsqueeze(1), k, v, None if mask is None else mask[:, None, None, :], scale, soft_cap)[:, 0]


def _gather(
    kv_cache: torch.Tensor, block_tables: torch.Tensor, length: int, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [B, length, Hkv, D] of each row's sequence, read block by block, in `dtype` (a float8 cache's
    blocks are gathered as they are, then widened: a quarter of the bytes to copy)."""
    batch, block_size = block_tables.shape[0], kv_cache.shape[2]
    num_blocks = -(-length // block_size)
    blocks = block_tables[:, :num_blocks].reshape(-1)
    # index_select copies whole blocks at memcpy speed; advanced indexing is twice as slow here.
    k = kv_cache[0].index_select(0, blocks).view(batch, num_blocks * block_size, *kv_cache.shape[3:])[:, :length]
    v = kv_cache[1].index_select(0, blocks).view(batch, num_blocks * block_size, *kv_cache.shape[3:])[:, :length]
    return k.to(dtype), v.to(dtype)


def _causal_mask(query_len: int, seq_len: int, device: torch.device, sliding_window: int | None = None) -> torch.Tensor | None:
    """Query i sits at position p = seq_len - query_len + i and sees keys up to it; with a sliding window W,
    only keys in (p - W, p] (transformers' convention, the same for every family)."""
    windowed = sliding_window is not None and seq_len > sliding_window
    if query_len == 1 and not windowed:
        return None
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    mask = q_pos >= k_pos
    return mask & (k_pos > q_pos - sliding_window) if windowed else mask


def _limited_mask(limits: torch.Tensor, seq_len: int, sliding_window: int | None = None) -> torch.Tensor:
    """_causal_mask with query i seeing keys up to limits[i] (>= its position), the window still from its position
    (transformers' AND(window, OR(causal, same image)))."""
    q_pos = torch.arange(seq_len - limits.shape[0], seq_len, device=limits.device)[:, None]
    k_pos = torch.arange(seq_len, device=limits.device)[None, :]
    mask = k_pos <= limits[:, None].to(torch.long)
    return mask & (k_pos > q_pos - sliding_window) if sliding_window is not None else mask


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
            soft_cap: float | None = None) -> torch.Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, Hkv, D] -> [B, Lq, H, D]. GQA without copying K/V per query head."""
    if soft_cap is not None:
        return _attend_soft_capped(q, k, v, mask, scale, soft_cap)
    gqa = q.shape[2] != k.shape[2]
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale, enable_gqa=gqa
    )
    return o.transpose(1, 2)


def _attend_soft_capped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                        soft_cap: float) -> torch.Tensor:
    """_attend with the scores squashed to cap * tanh(s / cap) before masking (Gemma 2), softmax in float32."""
    qpk = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2).unflatten(1, (k.shape[2], qpk))  # [B, Hkv, QPK, Lq, D]: GQA groups, no K/V copies
    scores = torch.einsum("bgjqd,bkgd->bgjqk", qh, k) * scale
    scores = torch.tanh(scores / soft_cap) * soft_cap
    if mask is not None:  # [Lq, Lk] or [B, 1, 1, Lk]
        scores = scores.masked_fill(~(mask if mask.dim() == 2 else mask[:, :, None]), float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
    o = torch.einsum("bgjqk,bkgd->bgjqd", probs, v)
    return o.flatten(1, 2).transpose(1, 2)
