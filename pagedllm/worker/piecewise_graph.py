"""Piecewise CUDA graphs for the steps that are not decode-only: prefills, prompt chunks, mixed batches.

Run eagerly, such a step is bound by the host at small token counts: on an H200 machine the 8B shape's
eager forward takes ~25 ms of Python launches for ~6 ms of GPU work at 128 tokens (a Triton launch
costs ~65 us there). The forward is captured once per padded token count of a ladder up to 512, in
pieces cut at each attention call (vLLM's piecewise graphs): projections, norms, the MLP, rotary + KV
write and the collectives depend on the token count alone, while the attention kernels depend on
the step's requests, so the attention runs eagerly between two pieces, with the step's metadata,
from a persistent q buffer into a persistent output buffer. Padding tokens (past the step's last
request) have slot -1: they write no K/V, no attention reads them, and their rows are never read.

The pieces share the decode graphs' memory pool and capture stream. Graphs in one pool must replay in
the order they were captured, and they do: one step replays one size's pieces in order.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Callable

import torch
from torch import nn

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata, dummy_metadata
from pagedllm.layers.attention import forward_context
from pagedllm.worker.cuda_graph import GraphInputs, Output, first_rows

PIECEWISE_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
# An attention call between two pieces: KV cache, scale, k/v scales, the layer's sliding window and soft cap.
_Call = tuple[torch.Tensor, float, float, float, int | None, float | None]


def piecewise_sizes(max_num_tokens: int) -> list[int]:
    """The ladder up to max_num_tokens (capped at 512; larger steps have the GPU time to hide their launches)."""
    top = min(max_num_tokens, PIECEWISE_SIZES[-1])
    return [s for s in PIECEWISE_SIZES if s < top] + [top]


class PiecewiseGraphRunner:
    def __init__(
        self, model: nn.Module, backend: AttentionBackend, max_num_tokens: int, block_size: int, device: torch.device,
        intermediate: tuple[int, torch.dtype] | None = None,
    ) -> None:
        """`intermediate`: (hidden size, dtype) of the activations a later pipeline stage receives."""
        self.model, self.backend, self.block_size, self.device = model, backend, block_size, device
        self.sizes = piecewise_sizes(max_num_tokens)
        self.inputs = GraphInputs(self.sizes[-1], device, intermediate)
        # Attention's input and output, shared by every layer and size (allocated at the first, largest, warm-up).
        self.query: torch.Tensor | None = None
        self.attn_out: torch.Tensor | None = None
        self.pieces: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.calls: dict[int, list[_Call]] = {}  # per cut: the layer's KV cache and scales
        self.outputs: dict[int, Output] = {}
        # While warming up: the dummy batch the attention runs on. While capturing: (pieces so far, cuts, pool).
        self._warmup_meta: AttentionMetadata | None = None
        self._capturing: tuple[list[torch.cuda.CUDAGraph], list[_Call], tuple[int, int]] | None = None

    # ---- the cut (layers.attention.AttentionCut) ----------------------------------------------
    def query_buffer(self, num_tokens: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        if self.query is None:
            self.query = torch.zeros(self.sizes[-1], num_heads, head_dim, dtype=dtype, device=self.device)
            self.attn_out = torch.zeros_like(self.query)
        return self.query[:num_tokens]

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, scale: float, k_scale: float = 1.0,
               v_scale: float = 1.0, sliding_window: int | None = None, soft_cap: float | None = None) -> torch.Tensor:
        assert self.attn_out is not None
        out = self.attn_out[: query.shape[0]]
        if self._capturing is None:
            assert self._warmup_meta is not None
            return self.backend.forward(query, kv_cache, self._warmup_meta, scale, out, k_scale, v_scale, sliding_window, soft_cap)
        pieces, calls, pool = self._capturing
        pieces[-1].capture_end()
        calls.append((kv_cache, scale, k_scale, v_scale, sliding_window, soft_cap))
        pieces.append(_begin(pool))
        return out

    # ---- capture and replay --------------------------------------------------------------------
    def _forward(self, n: int) -> Output:
        return self.model(*self.inputs.first(n))

    @torch.inference_mode()
    def capture(self, pool: tuple[int, int], stream: torch.cuda.Stream) -> None:
        """Captures every size, largest first, into `pool` on `stream` (the decode graphs' own)."""
        for n in reversed(self.sizes):
            # The KV write inside the pieces reads the persistent slot buffer (all -1 here: writes nothing).
            meta = dataclasses.replace(dummy_metadata([n], [n], self.block_size, self.device), slot_mapping=self.inputs.slot_mapping[:n])
            # Warm-up, eagerly: kernels compile (and collectives pair up) outside the capture.
            self._warmup_meta = meta
            with forward_context(self.backend, meta, self):
                self._forward(n)
            self._warmup_meta = None
            torch.cuda.synchronize()
            pieces: list[torch.cuda.CUDAGraph] = []
            calls: list[_Call] = []
            with torch.cuda.stream(stream), forward_context(self.backend, meta, self):
                pieces.append(_begin(pool))
                self._capturing = (pieces, calls, pool)
                try:
                    out = self._forward(n)
                finally:
                    self._capturing = None
                pieces[-1].capture_end()
            self.pieces[n], self.calls[n], self.outputs[n] = pieces, calls, out
        torch.cuda.synchronize()

    def release(self) -> None:
        torch.cuda.synchronize()
        for pieces in self.pieces.values():
            for graph in pieces:
                graph.reset()
        self.pieces.clear()
        self.calls.clear()
        self.outputs.clear()

    def can_run(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.sizes[-1]

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor, meta: AttentionMetadata,
        intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_written: Callable[[torch.Tensor], None] | None = None,
    ) -> Output:
        """The step's n tokens (device tensors) and attention metadata; returns hidden states [n, hidden]
        (a stage before the last: its (hidden, residual) pair). `kv_written(kv_cache)`: after the piece that writes
        a layer's K/V (a KV producer's signal, kv_transfer/layer_events.py)."""
        n = input_ids.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.inputs.fill(size, input_ids, positions, slot_mapping, intermediate)
        assert self.query is not None and self.attn_out is not None
        query, out = self.query[:n], self.attn_out[:n]
        pieces = self.pieces[size]
        for graph, (kv_cache, scale, k_scale, v_scale, window, cap) in zip(pieces, self.calls[size]):
            graph.replay()
            if kv_written is not None:
                kv_written(kv_cache)
            self.backend.forward(query, kv_cache, meta, scale, out, k_scale, v_scale, window, cap)
        pieces[-1].replay()
        return first_rows(self.outputs[size], n)


def _begin(pool: tuple[int, int]) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    graph.capture_begin(pool=pool)
    return graph
