"""Sliding windows and soft-capped scores in every attention path (unified, split-KV, shared-prefix, and the torch
backend) against the float64 reference: windows shorter and longer than the contexts, across block boundaries.
Blocks wholly before every query's window are pointed at NaN-filled blocks, as a KV manager that frees them would
leave them, so a read of one shows."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from pagedllm.kernels import sm_count  # noqa: E402
from pagedllm.kernels.paged_attention import (  # noqa: E402
    paged_attention_ref,
    shared_prefix_decode,
    split_kv_decode,
    unified_attention,
)
from tests.kernels.test_paged_attention import F32, BF16, ON_CUDA, Batch, make_batch, share_prefix  # noqa: E402

# (window, soft cap): windows inside one block, across several, and longer than every context.
OPTIONS = [(5, None), (16, 2.0), (37, None), (None, 1.5), (5000, 3.0)]
REQS = [(1, 0), (1, 200), (1, 33), (70, 0), (13, 150), (3, 29)] if not ON_CUDA else \
    [(1, 0), (1, 700), (1, 33), (1, 1500), (300, 0), (77, 1000), (1000, 230), (16, 16)]


def reference(b: Batch, scale: float, window: int | None, cap: float | None) -> torch.Tensor:
    m = b.meta
    cache = b.kv_cache.nan_to_num(0.0)  # the reference gathers dropped blocks too (and masks them)
    return paged_attention_ref(b.q, cache, m.query_start_loc_cpu, m.seq_lens_cpu, m.block_tables, scale,
                               sliding_window=window, soft_cap=cap)


def drop_outside_window(b: Batch, window: int | None) -> None:
    """Points each request's blocks that no query of it sees at a spare (NaN) block."""
    if window is None:
        return
    m, block_size = b.meta, b.kv_cache.shape[2]
    spare = sorted(set(range(b.kv_cache.shape[1])) - set(m.block_tables.flatten().tolist()))[0]
    for r, seq_len in enumerate(m.seq_lens_cpu):
        q_len = m.query_start_loc_cpu[r + 1] - m.query_start_loc_cpu[r]
        first_seen = max(0, seq_len - q_len - window + 1)
        m.block_tables[r, : first_seen // block_size] = spare


@pytest.mark.parametrize("window,cap", OPTIONS)
@pytest.mark.parametrize("dtype,block_m", [(F32, None), (BF16, None), (F32, 16)])
def test_unified(device, assert_close, window, cap, dtype, block_m):
    b = make_batch(REQS, 4, 2, 32, 16, dtype, device, seed=11)
    drop_outside_window(b, window)
    m = b.meta
    out = unified_attention(b.q, b.kv_cache, torch.empty_like(b.q), m.query_start_loc, m.seq_lens, m.block_tables,
                            m.max_query_len, 0.2, block_m=block_m, sliding_window=window, soft_cap=cap)
    assert_close(out, reference(b, 0.2, window, cap))


@pytest.mark.parametrize("window,cap", OPTIONS)
def test_split_kv(device, assert_close, window, cap):
    """Windows that one partition, several or all of them cover; an empty sequence gets zeros."""
    lens = (0, 40, 100, 300) if not ON_CUDA else (0, 40, 300, 4000, 9000)
    b = make_batch([(1, n) for n in lens], 4, 1, 32, 16, F32, device, seed=12)
    drop_outside_window(b, window)
    m = b.meta
    out = split_kv_decode(b.q, b.kv_cache, torch.full_like(b.q, float("nan")), m.seq_lens, m.block_tables, 0.2,
                          num_parts=3, sliding_window=window, soft_cap=cap)
    assert_close(out, reference(b, 0.2, window, cap))


@pytest.mark.parametrize("window,cap", OPTIONS + [(60, None)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_shared_prefix(device, assert_close, window, cap, num_splits):
    """Windows that end inside the shared prefix for some rows and past it for others."""
    lens = [100, 70, 200, 37, 150] if not ON_CUDA else [1100, 700, 1300, 1025, 2000] * 14
    b = make_batch([(1, n) for n in lens], 4, 2, 32, 16, F32, device, seed=13)
    prefix = share_prefix(b, min(lens) // 16)
    m = b.meta
    out = shared_prefix_decode(b.q, b.kv_cache, torch.full_like(b.q, float("nan")), m.query_start_loc, m.seq_lens,
                               m.block_tables, prefix, 0.2, sm_count(device), num_splits=num_splits,
                               sliding_window=window, soft_cap=cap)
    assert_close(out, reference(b, 0.2, window, cap))


@pytest.mark.parametrize("window,cap", OPTIONS)
def test_torch_backend(assert_close, window, cap):
    """The CPU backend (the engine's path on CPU) on the same batches."""
    b = make_batch(REQS, 4, 2, 32, 16, F32, torch.device("cpu"), seed=14)
    drop_outside_window(b, window)
    b.kv_cache.nan_to_num_(0.0)  # the torch backend gathers whole blocks and masks after: NaN would poison it
    out = TorchAttentionBackend().forward(b.q, b.kv_cache, b.meta, 0.2, sliding_window=window, soft_cap=cap)
    assert_close(out, reference(b, 0.2, window, cap))
