"""Attention through the Triton kernels in pagedllm.kernels (the CUDA backend).

forward picks one of two paths:
- unified varlen kernel: any batch (decodes and prefill chunks together), one launch;
- split-KV decode (flash-decoding): only when every request is a decode, the context is long
  (max_seq_len >= 1024) and there are too few (request, KV head) programs to fill the GPU
  (num_decodes * num_kv_heads < 2 * num_SMs). There the unified kernel would leave SMs idle while
  a few programs each walk thousands of keys; splitting the keys into partitions (sized for ~2
  waves, >= 256 keys each) spreads them over the SMs at the cost of one small merge kernel.
"""

from __future__ import annotations

import functools

import torch

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.kernels.paged_attention import split_kv_decode, split_kv_partition, unified_attention

SPLIT_KV_MIN_SEQ_LEN = 1024


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM; only matters for CPU (interpreter) runs


def use_split_kv(meta: AttentionMetadata, num_kv_heads: int, num_sms: int) -> bool:
    return (
        meta.allow_split_kv
        and meta.num_reqs > 0
        and meta.num_decodes == meta.num_reqs
        and meta.max_seq_len >= SPLIT_KV_MIN_SEQ_LEN
        and meta.num_decodes * num_kv_heads < 2 * num_sms
    )


class TritonAttentionBackend:
    name = "triton"

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if query.stride(-1) != 1:
            query = query.contiguous()
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if query.shape[0] == 0:
            return out
        num_kv_heads = kv_cache.shape[3]
        num_sms = _num_sms(query.device)
        if use_split_kv(meta, num_kv_heads, num_sms):
            n = meta.num_decodes  # rows past n (padding) are left unwritten
            partition = split_kv_partition(meta.max_seq_len, n * num_kv_heads, num_sms)
            split_kv_decode(query[:n], kv_cache, out[:n], meta.seq_lens, meta.block_tables, meta.max_seq_len, scale, partition)
            return out
        return unified_attention(
            query, kv_cache, out, meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.max_query_len, scale
        )
