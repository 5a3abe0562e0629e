"""The attention backend interface: the one seam between model code and attention kernels.

A step's batch is flat: `num_tokens` query tokens from `num_reqs` requests, decodes (one query
token each) first, then prefills / prompt chunks. Each request's keys and values live in the
paged KV cache, reached through its row of `block_tables`.

KV cache layout, per layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V), in the model's
dtype or in float8_e4m3fn (--kv-cache-dtype fp8), which holds K / k_scale and V / v_scale: per-tensor scales
(Python floats fixed at load, 1.0 unless the checkpoint has them), passed to every write and read.
Slot `s` is position `s % block_size` of block `s // block_size`; slot -1 means "don't write".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from pagedllm.quantization.fp8_utils import FP8_DTYPE as KV_FP8, FP8_MAX

# quantize_fp8: here, not in pagedllm.kernels, which imports triton: the CPU path never needs it (and kernel tests
# set TRITON_INTERPRET first).


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale in float8_e4m3fn, saturated at +-448 (as vLLM does): computed as x * (1 / scale) in fp32, which is
    what the Triton KV write computes too, so that both store the same bits."""
    return (x.float() * (1.0 / scale)).clamp_(-FP8_MAX, FP8_MAX).to(KV_FP8)


@dataclass
class AttentionMetadata:
    num_reqs: int
    num_decodes: int  # the first num_decodes requests have query length 1
    num_decode_tokens: int  # == num_decodes; the prefill tokens follow
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, prefix sums of the query lengths
    seq_lens: torch.Tensor  # [num_reqs] int32, context length including this step's tokens
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int32, unused entries are 0
    slot_mapping: torch.Tensor  # [num_tokens] int64
    # Host copies, for backends that loop over requests on the CPU.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Decode-only batches: int32 [1] on the device, the length of the prefix (whole blocks, shorter than
    # every context) that all requests share, block for block, at the start of their block tables (one
    # system prompt, the samples or beams of one prompt). A backend may attend it once for all of them.
    common_prefix: torch.Tensor | None = None
    # Prompt steps of a model whose image tokens attend to each other both ways (Gemma 3): int32 [num_tokens] on the
    # device, the last key position (in its sequence) each query sees: its own position for text, its image's last
    # token for an image token. Never on decodes (a one-token query's limit is its position) nor in CUDA graphs;
    # None: causal. A sliding window still counts back from the query's own position.
    key_limits: torch.Tensor | None = None


# Decode batch sizes that CUDA graphs are captured at (worker/cuda_graph.py): a decode batch pads to the
# next one. A backend that picks its kernels by batch size decides on these sizes, so that a batch takes
# the same path in a graph as it does eagerly.
GRAPH_BATCH_SIZES = [1, 2, 4, 8, *range(16, 256, 8), *range(256, 513, 16)]


def dummy_metadata(
    query_lens: list[int], seq_lens: list[int], block_size: int, device: torch.device, common_prefix: int = 0,
) -> AttentionMetadata:
    """A batch whose contexts all read block 0 and whose tokens write nothing (slot -1), for forwards that
    profile memory, compile kernels or warm up a capture. common_prefix: the prefix a decode-only batch shares."""
    reqs, tokens = len(query_lens), sum(query_lens)
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    num_decodes = reqs if max(query_lens) == 1 else 0
    return AttentionMetadata(
        num_reqs=reqs, num_decodes=num_decodes, num_decode_tokens=num_decodes, max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.zeros(reqs, -(-max(seq_lens) // block_size), dtype=torch.int32, device=device),
        slot_mapping=torch.full((tokens,), -1, dtype=torch.int64, device=device),
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens,
        common_prefix=torch.tensor([common_prefix], dtype=torch.int32, device=device) if common_prefix else None,
    )


class AttentionBackend(Protocol):
    name: str
    # (requests, tokens): the smallest decode batch and shared prefix that the backend attends as one
    # (AttentionMetadata.common_prefix); None: it never does, and the prefix is not looked for.
    shared_prefix_min: tuple[int, int] | None

    def takes_shared_prefix(self, num_reqs: int, num_kv_heads: int, device: torch.device) -> bool:
        """Whether a decode-only batch of num_reqs (a CUDA-graph size) with a common prefix attends it once."""

    def forward(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        out: torch.Tensor | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
        sliding_window: int | None = None, soft_cap: float | None = None,
    ) -> torch.Tensor:
        """Causal attention of query [num_tokens, num_heads, head_dim] over each request's
        cached context (this step's keys included); returns [num_tokens, num_heads, head_dim],
        in `out` when given. k_scale, v_scale: a float8 cache's scales (1.0 for any other).
        sliding_window W: the query at position p sees only keys in (p - W, p]; soft_cap c: scores s
        become c * tanh(s / c) before masking and softmax (the layer's options; None: off). With meta.key_limits,
        the query at p sees keys up to its limit L >= p instead: (p - W, L]."""


def get_attention_backend(name: str | None, device: torch.device) -> AttentionBackend:
    """'torch' on CPU, 'triton' on CUDA unless `name` says otherwise."""
    if name is None or name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from pagedllm.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from pagedllm.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"attention_backend must be 'auto', 'torch' or 'triton', got {name!r}.")
