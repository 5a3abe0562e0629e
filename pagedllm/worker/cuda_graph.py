"""CUDA graphs for decode-only steps.

The decode forward is captured once per batch size of a ladder (1, 2, 4, 8, 16, 24, 32, ... up to
max_num_seqs or 512) over persistent input buffers. A step with n decodes copies its inputs into the
buffers, pads to the next captured size (padding rows write no K/V: slot -1, context length 0),
replays, and reads the first n rows of the captured output. Launch overhead, which dominates
small decode batches, disappears. Sizes at which the attention backend attends a prefix that all
requests share once for all (AttentionMetadata.common_prefix; the backend names them) get a second
graph that does, replayed for batches that have one; its length sits in a persistent buffer too.

With LoRA on, the graphs also run every adapted linear's row-indexed LoRA kernels over a persistent buffer of each
row's adapter slot (-1: the base model), filled at each replay, so one graph serves any mix of adapters.

Under tensor parallelism every rank captures the same sizes in the same order, so the all-reduces
inside the graphs pair up at replay as they did eagerly. Under pipeline parallelism a graph holds one
stage's layers: a later stage's (hidden, residual) input arrives in persistent buffers (received
outside the graph), and a stage before the last returns its (hidden, residual) pair.
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

from pagedllm.attention.backend import GRAPH_BATCH_SIZES, AttentionBackend, AttentionMetadata
from pagedllm.layers.attention import Attention, forward_context
from pagedllm.lora.layers import LoRABatch, current_lora_batch, lora_context


MAX_CAPTURE_SIZE = GRAPH_BATCH_SIZES[-1]  # 512: larger decode batches are compute-bound enough to run eagerly


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256, every 16 up to 512, and the largest batch (capped)."""
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    return [s for s in GRAPH_BATCH_SIZES if s < top] + [top]


Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class GraphInputs:
    """The persistent token inputs of captured forwards: ids, positions, cache slots, and under pipeline
    parallelism the (hidden, residual) pair a later stage receives."""

    def __init__(self, n: int, device: torch.device, intermediate: tuple[int, torch.dtype] | None) -> None:
        """`intermediate`: (hidden size, dtype) of the activations a later pipeline stage receives."""
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.intermediate = None
        if intermediate is not None:
            hidden_size, dtype = intermediate
            self.intermediate = (torch.zeros(n, hidden_size, dtype=dtype, device=device), torch.zeros(n, hidden_size, dtype=dtype, device=device))

    def first(self, n: int) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The model's arguments for a forward over the first n rows."""
        inter = None if self.intermediate is None else (self.intermediate[0][:n], self.intermediate[1][:n])
        return self.input_ids[:n], self.positions[:n], inter

    def fill(
        self, padded: int, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
        intermediate: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        """Copies a step's n tokens in; rows n..padded keep stale ids and positions but write no K/V."""
        n = input_ids.shape[0]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.slot_mapping[n:padded].fill_(-1)
        if intermediate is not None:
            assert self.intermediate is not None
            for buffer, value in zip(self.intermediate, intermediate):
                buffer[:n].copy_(value)


def first_rows(out: Output, n: int) -> Output:
    return out[:n] if isinstance(out, torch.Tensor) else (out[0][:n], out[1][:n])


class CudaGraphRunner:
    def __init__(
        self, model: nn.Module, backend: AttentionBackend, max_num_seqs: int, max_blocks: int, device: torch.device,
        intermediate: tuple[int, torch.dtype] | None = None, lora: bool = False,
    ) -> None:
        """`intermediate`: (hidden size, dtype) of the activations a later pipeline stage receives; lora: the model's
        linears carry LoRA slots (enable_lora)."""
        self.model, self.backend = model, backend
        self.sizes = capture_sizes(max_num_seqs)
        n = self.sizes[-1]
        i32 = torch.int32
        self.inputs = GraphInputs(n, device, intermediate)
        self.seq_lens = torch.zeros(n, dtype=i32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=i32, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=i32, device=device)
        self.common_prefix = torch.zeros(1, dtype=i32, device=device)
        self.lora_slots = torch.full((n,), -1, dtype=torch.int64, device=device) if lora else None
        kv_heads = next(m.num_kv_heads for m in model.modules() if isinstance(m, Attention))
        self.shared_sizes = [s for s in self.sizes if backend.takes_shared_prefix(s, kv_heads, device)]
        # One memory pool and capture stream, shared with the piecewise graphs (worker/piecewise_graph.py).
        self.pool, self.stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(device)
        # Keyed by (batch size, with a shared prefix).
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, bool], Output] = {}

    def _meta(self, bs: int, shared: bool) -> AttentionMetadata:
        return AttentionMetadata(
            num_reqs=bs, num_decodes=bs, num_decode_tokens=bs, max_query_len=1, max_seq_len=1,
            query_start_loc=self.query_start_loc[: bs + 1], seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs], slot_mapping=self.inputs.slot_mapping[:bs],
            query_start_loc_cpu=[], seq_lens_cpu=[], common_prefix=self.common_prefix if shared else None,
        )

    def _forward(self, bs: int) -> Output:
        return self.model(*self.inputs.first(bs))

    @torch.inference_mode()
    def capture(self) -> None:
        keys = [(bs, False) for bs in self.sizes] + [(bs, True) for bs in self.shared_sizes]
        for key in sorted(keys, reverse=True):  # largest first, so smaller graphs reuse its memory pool
            lora = None if self.lora_slots is None else LoRABatch(self.lora_slots[: key[0]])
            with forward_context(self.backend, self._meta(*key)), lora_context(lora):
                self._forward(key[0])  # warm-up: compile kernels (and pair up collectives) outside capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                    self.outputs[key] = self._forward(key[0])
            self.graphs[key] = graph
        torch.cuda.synchronize()

    def release(self) -> None:
        """Frees the graphs (before a process group whose collectives they captured is destroyed: NCCL's
        teardown waits on them otherwise, pytorch/pytorch#115388)."""
        torch.cuda.synchronize()
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()

    def can_run(self, num_reqs: int) -> bool:
        return 0 < num_reqs <= self.sizes[-1]

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
        seq_lens: torch.Tensor, block_tables: torch.Tensor, intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,
        common_prefix: torch.Tensor | None = None,
    ) -> Output:
        """Inputs are device tensors of the n decodes (common_prefix: see AttentionMetadata); returns hidden
        states [n, hidden] (a stage before the last: its (hidden, residual) pair)."""
        n = input_ids.shape[0]
        bs = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.inputs.fill(bs, input_ids, positions, slot_mapping, intermediate)
        self.seq_lens[:n].copy_(seq_lens)
        self.seq_lens[n:bs].fill_(0)
        self.block_tables[:n, : block_tables.shape[1]].copy_(block_tables)
        if self.lora_slots is not None:  # the step's adapter slots (lora_context), one token per row
            lora = current_lora_batch()
            if lora is None:
                self.lora_slots[:bs].fill_(-1)
            else:
                self.lora_slots[:n].copy_(lora.token_slots)
                self.lora_slots[n:bs].fill_(-1)
        key = (bs, common_prefix is not None and (bs, True) in self.graphs)
        if key[1]:
            assert common_prefix is not None
            self.common_prefix.copy_(common_prefix)
        self.graphs[key].replay()
        return first_rows(self.outputs[key], n)
