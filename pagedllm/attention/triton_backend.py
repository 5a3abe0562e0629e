"""Attention through the Triton kernels in pagedllm.kernels (the CUDA backend).

forward picks one of two paths:
- unified varlen kernel: any batch; a mixed one in two launches, decodes in one-token tiles and
  prompt chunks in large ones;
- split-KV decode (flash-decoding): decode-only batches too small to fill the GPU with one program
  per (request, KV head): up to the largest graph batch size whose programs fit in two waves
  (32 requests for 8 KV heads on 132 SMs). There the unified kernel would leave SMs idle while each
  program walks its whole context; splitting every sequence's keys into up to SPLIT_KV_PARTS pieces
  spreads them over the SMs at the cost of one small merge kernel. The choice depends on the batch
  size alone (on the sizes CUDA graphs pad to), so graph replays and eager steps run the same kernels.
- shared-prefix decode (cascade attention): larger decode-only batches whose requests all start with
  the same cached blocks (the metadata's common_prefix) attend that prefix once for all of them, then
  each request's own keys; otherwise every (request, KV head) program would read the prefix again.
Per-query key limits (Gemma 3's images: AttentionMetadata.key_limits) come with prompt steps only, and go to the
prompt chunks' launch; the decodes of a mixed batch see up to their own position anyway.
"""

from __future__ import annotations

import functools

import torch

from pagedllm.attention.backend import GRAPH_BATCH_SIZES, AttentionMetadata
from pagedllm.kernels import sm_count
from pagedllm.kernels.paged_attention import shared_prefix_decode, split_kv_decode, unified_attention

# Decode batches from this many requests, sharing at least this many tokens, take the shared-prefix path.
SHARED_PREFIX_MIN_REQS = 64
SHARED_PREFIX_MIN_TOKENS = 256


@functools.cache
def split_kv_max_batch(num_kv_heads: int, num_sms: int) -> int:
    """Largest graph batch size whose (request, KV head) programs fit in two waves over the SMs."""
    return max((s for s in GRAPH_BATCH_SIZES if s * num_kv_heads <= 2 * num_sms), default=0)


def use_split_kv(meta: AttentionMetadata, num_kv_heads: int, num_sms: int) -> bool:
    return 0 < meta.num_reqs == meta.num_decodes and meta.num_reqs <= split_kv_max_batch(num_kv_heads, num_sms)


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _realigned(t: torch.Tensor) -> torch.Tensor:
    """A slice at an offset that is not 16-byte aligned, copied: Triton compiles a kernel variant per
    pointer alignment, and a new variant would compile in the middle of a run."""
    return t if _aligned(t) else t.clone()


# A mixed batch's prompt part: query starts, context lengths, block tables, key limits (or None)
_PromptPart = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]


class TritonAttentionBackend:
    name = "triton"
    shared_prefix_min = (SHARED_PREFIX_MIN_REQS, SHARED_PREFIX_MIN_TOKENS)

    def __init__(self) -> None:
        # The last mixed step's metadata and its prompt part: every layer of a step gets the same metadata.
        self._prompt_part: tuple[AttentionMetadata, _PromptPart] | None = None

    def takes_shared_prefix(self, num_reqs: int, num_kv_heads: int, device: torch.device) -> bool:
        """Whether forward attends a decode-only batch's common prefix once at this size: from the minimum
        batch, and past the split-KV sizes (split-KV comes first, prefix or not)."""
        return num_reqs >= self.shared_prefix_min[0] and num_reqs > split_kv_max_batch(num_kv_heads, sm_count(device))

    def forward(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float, out: torch.Tensor | None = None,
        k_scale: float = 1.0, v_scale: float = 1.0, sliding_window: int | None = None, soft_cap: float | None = None,
    ) -> torch.Tensor:
        opts = dict(k_scale=k_scale, v_scale=v_scale, sliding_window=sliding_window, soft_cap=soft_cap)
        if query.stride(-1) != 1:
            query = query.contiguous()
        if out is None:
            out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if query.shape[0] == 0:
            return out
        num_kv_heads = kv_cache.shape[3]
        assert meta.key_limits is None or meta.num_decodes < meta.num_reqs, "key limits on a decode-only step"
        if use_split_kv(meta, num_kv_heads, sm_count(query.device)):
            n = meta.num_decodes  # rows past n (padding) are left unwritten
            split_kv_decode(query[:n], kv_cache, out[:n], meta.seq_lens, meta.block_tables, scale, **opts)
            return out
        if meta.common_prefix is not None and meta.num_decodes == meta.num_reqs:
            return shared_prefix_decode(query, kv_cache, out, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                        meta.common_prefix, scale, sm_count(query.device), **opts)
        nd = meta.num_decodes
        if 0 < nd < meta.num_reqs and meta.max_query_len > 1:
            # A mixed batch: its decodes (first) in one-token tiles, its prompt chunks in large ones, as
            # one launch would give every request the large tiles, and decodes would waste most rows.
            unified_attention(query[:nd], kv_cache, out[:nd], meta.query_start_loc[: nd + 1], meta.seq_lens[:nd],
                              meta.block_tables[:nd], 1, scale, **opts)
            rest = out[nd:]
            dst = rest if _aligned(rest) else torch.empty_like(rest)
            qsl, lens, tables, limits = self._prompts_of(meta)
            unified_attention(_realigned(query[nd:]), kv_cache, dst, qsl, lens, tables, meta.max_query_len, scale,
                              key_limits=limits, **opts)
            if dst is not rest:
                rest.copy_(dst)
            return out
        return unified_attention(
            query, kv_cache, out, meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.max_query_len, scale,
            key_limits=meta.key_limits, **opts,
        )

    def _prompts_of(self, meta: AttentionMetadata) -> _PromptPart:
        """A mixed batch's prompt chunks: query starts from 0, context lengths, block tables and key limits (16-byte
        aligned), made once per step rather than once per layer."""
        if self._prompt_part is None or self._prompt_part[0] is not meta:
            nd, limits = meta.num_decodes, meta.key_limits
            self._prompt_part = (meta, (meta.query_start_loc[nd:] - nd, _realigned(meta.seq_lens[nd:]),
                                        _realigned(meta.block_tables[nd:]),
                                        None if limits is None else _realigned(limits[nd:])))
        return self._prompt_part[1]
