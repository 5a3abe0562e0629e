import math
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.attention.backend import KV_FP8, AttentionMetadata, quantize_fp8  # noqa: E402
from pagedllm.attention.torch_backend import write_kv  # noqa: E402
from pagedllm.attention.triton_backend import TritonAttentionBackend, split_kv_max_batch, use_split_kv  # noqa: E402
from pagedllm.kernels import sm_count  # noqa: E402
from pagedllm.kernels.paged_attention import (  # noqa: E402
    paged_attention_ref,
    shared_prefix_decode,
    split_kv_decode,
    unified_attention,
)

ON_CUDA = torch.cuda.is_available()
F32, BF16 = torch.float32, torch.bfloat16


@dataclass
class Batch:
    q: torch.Tensor  # [T, H, D]
    kv_cache: torch.Tensor
    meta: AttentionMetadata
    new_k: torch.Tensor  # this step's keys/values [T, Hkv, D], already in the cache
    new_v: torch.Tensor
    kv_scales: tuple[float, float] = (1.0, 1.0)  # a float8 cache's (k_scale, v_scale)

    @property
    def scales(self) -> dict[str, float]:
        return dict(zip(("k_scale", "v_scale"), self.kv_scales))


def make_batch(reqs: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
               dtype: torch.dtype, device: torch.device, seed: int = 0, kv_scales: tuple[float, float] | None = None) -> Batch:
    """reqs: (query_len, cached context_len), decodes first. Blocks are handed out in shuffled
    order; every cache slot outside the sequences holds NaN, so any stray read shows. kv_scales: a float8 cache
    holding K / k_scale and V / v_scale (random values of about the scales' size, so the quantized ones span the format)."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in reqs]
    per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(per_req) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    block_tables = torch.zeros(len(reqs), max(per_req), dtype=torch.int32)
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    q_lens = [q for q, _ in reqs]
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    slots = []
    for r, (seq_len, n) in enumerate(zip(seq_lens, per_req)):
        block_tables[r, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
        pos = torch.arange(seq_len)
        phys = block_tables[r, pos // block_size].long()
        cache[:, phys, pos % block_size] = torch.randn(2, seq_len, num_kv_heads, head_dim, generator=g)
        new_pos = pos[seq_len - q_lens[r]:]
        slots.append(block_tables[r, new_pos // block_size].long() * block_size + new_pos % block_size)
    slot_mapping = torch.cat(slots).to(device)
    if kv_scales:
        cache = torch.stack([quantize_fp8(cache[i] * 30 * kv_scales[i], kv_scales[i]) for i in (0, 1)]).to(device)
    else:
        cache = cache.to(device, dtype)
    flat = cache.view(2, -1, num_kv_heads, head_dim)
    num_decodes = next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens))
    meta = AttentionMetadata(
        num_reqs=len(reqs), num_decodes=num_decodes, num_decode_tokens=num_decodes, max_query_len=max(q_lens),
        max_seq_len=max(seq_lens), query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_tables=block_tables.to(device),
        slot_mapping=slot_mapping, query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens,
    )
    q = torch.randn(qsl[-1], num_heads, head_dim, generator=g).to(device, dtype)
    new_k, new_v = (flat[i].index_select(0, slot_mapping) for i in (0, 1))
    return Batch(q, cache, meta, new_k, new_v, kv_scales or (1.0, 1.0))


def reference(b: Batch, scale: float) -> torch.Tensor:
    m = b.meta
    return paged_attention_ref(b.q, b.kv_cache, m.query_start_loc_cpu, m.seq_lens_cpu, m.block_tables, scale, *b.kv_scales)


# A float8 cache's scales in the tests: unlike each other and 1, so a scale applied to the wrong tensor, twice or
# not at all shows.
FP8_SCALES = (0.07, 2.5)


# (num_heads, num_kv_heads, head_dim, block_size, dtype): GQA ratios 1, 4, 7; block sizes 16 and 32.
if ON_CUDA:
    CASES = [
        (h, kv, d, bs, dt)
        for h, kv in [(8, 8), (32, 8), (28, 4)] for d in (64, 128) for bs in (16, 32) for dt in (F32, BF16)
    ]
    CASES += [(16, 4, 80, 16, BF16), (16, 4, 96, 32, F32)]  # head dims padded to a power of two
    # Decodes first (one with a single key), then a fresh prompt and chunks with cached context.
    REQS = [(1, 0), (1, 700), (1, 33), (1, 1500), (300, 0), (77, 1000), (1000, 230), (16, 16)]
else:
    CASES = [(2, 2, 64, 16, F32), (8, 2, 128, 32, BF16), (7, 1, 64, 16, BF16), (7, 1, 32, 32, F32), (4, 2, 48, 16, F32)]
    REQS = [(1, 0), (1, 200), (1, 33), (70, 0), (13, 150), (3, 29)]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,dtype", CASES)
def test_unified_mixed_batch(device, assert_close, num_heads, num_kv_heads, head_dim, block_size, dtype):
    b = make_batch(REQS, num_heads, num_kv_heads, head_dim, block_size, dtype, device)
    scale = 1 / math.sqrt(head_dim)
    out = torch.empty_like(b.q)
    m = b.meta
    unified_attention(b.q, b.kv_cache, out, m.query_start_loc, m.seq_lens, m.block_tables, m.max_query_len, scale)
    assert_close(out, reference(b, scale))


@pytest.mark.parametrize("num_heads,num_kv_heads,block_m", [(2, 2, 16), (8, 2, 16), (7, 1, 32)])
def test_unified_many_query_tiles(device, assert_close, num_heads, num_kv_heads, block_m):
    """Small query tiles, so prompts span several tiles and tiles straddle request boundaries."""
    b = make_batch(REQS, num_heads, num_kv_heads, 64, 16, F32, device, seed=5)
    m = b.meta
    out = torch.empty_like(b.q)
    unified_attention(
        b.q, b.kv_cache, out, m.query_start_loc, m.seq_lens, m.block_tables, m.max_query_len, 0.125,
        block_m=block_m, tile_n=32,
    )
    assert_close(out, reference(b, 0.125))


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_unified_decode_only(device, assert_close, dtype):
    reqs = [(1, n) for n in ((0, 5, 900, 2047) if ON_CUDA else (0, 5, 90))]
    b = make_batch(reqs, 8, 2, 64, 16, dtype, device, seed=1)
    m = b.meta
    out = torch.empty_like(b.q)
    unified_attention(b.q, b.kv_cache, out, m.query_start_loc, m.seq_lens, m.block_tables, 1, 0.125)
    assert_close(out, reference(b, 0.125))


def test_unified_single_prompt(device, assert_close):
    """One request, no decodes: a lone prompt chunk over cached context (num_reqs == 1 specialises)."""
    b = make_batch([(300, 700) if ON_CUDA else (40, 25)], 4, 4, 64, 32, BF16, device, seed=6)
    m = b.meta
    out = unified_attention(b.q, b.kv_cache, torch.empty_like(b.q), m.query_start_loc, m.seq_lens, m.block_tables,
                            m.max_query_len, 0.125)
    assert_close(out, reference(b, 0.125))


SPLIT_CASES = [(8, 8, BF16), (32, 8, F32), (28, 4, BF16)] if ON_CUDA else [(4, 1, BF16), (7, 1, F32)]


@pytest.mark.parametrize("num_heads,num_kv_heads,dtype", SPLIT_CASES)
def test_split_kv_decode(device, assert_close, num_heads, num_kv_heads, dtype):
    """Lengths give one partition, several, and all of them (one partly filled); an empty sequence
    (a CUDA graph's padding row) gets zeros."""
    lens, num_parts = ((0, 40, 300, 4000, 9000), 16) if ON_CUDA else ((0, 40, 100, 300), 3)
    b = make_batch([(1, n) for n in lens], num_heads, num_kv_heads, 64, 16, dtype, device, seed=2)
    m = b.meta
    out = torch.full_like(b.q, float("nan"))
    split_kv_decode(b.q, b.kv_cache, out, m.seq_lens, m.block_tables, 0.125, num_parts=num_parts)
    assert_close(out, reference(b, 0.125))
    padded = m.seq_lens.clone()
    padded[0] = 0
    split_kv_decode(b.q[:1], b.kv_cache, out[:1], padded, m.block_tables, 0.125, num_parts=num_parts)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_split_kv_rows_ignore_the_batch(device):
    """A sequence's partitions follow its own length: alone or beside longer ones, the same result."""
    b = make_batch([(1, 150), (1, 700)], 4, 2, 64, 16, F32, device, seed=7)
    m = b.meta
    both = split_kv_decode(b.q, b.kv_cache, torch.empty_like(b.q), m.seq_lens, m.block_tables, 0.125, num_parts=4)
    alone = split_kv_decode(b.q[:1], b.kv_cache, torch.empty_like(b.q[:1]), m.seq_lens[:1], m.block_tables[:1], 0.125, num_parts=4)
    assert torch.equal(both[:1], alone)


def share_prefix(b: Batch, num_blocks: int) -> torch.Tensor:
    """Points every request's first num_blocks at request 0's (as prefix caching would); returns the
    prefix length in tokens as the int32 [1] device tensor the kernels read."""
    block_size = b.kv_cache.shape[2]
    assert num_blocks * block_size < min(b.meta.seq_lens_cpu)
    b.meta.block_tables[1:, :num_blocks] = b.meta.block_tables[0, :num_blocks]
    return torch.tensor([num_blocks * block_size], dtype=torch.int32, device=b.q.device)


if ON_CUDA:
    SHARED_CASES = [(32, 8, 128, 16, BF16), (16, 8, 128, 16, BF16), (28, 4, 64, 32, F32), (8, 8, 64, 16, F32)]
else:
    SHARED_CASES = [(4, 1, 64, 16, F32), (8, 2, 64, 16, BF16), (7, 1, 32, 32, F32), (4, 2, 48, 16, F32)]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,dtype", SHARED_CASES)
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_shared_prefix_decode(device, assert_close, num_heads, num_kv_heads, head_dim, block_size, dtype, num_splits):
    """A prefix of whole blocks that is no multiple of the key tile; a padded head dim (48); splits that leave some empty
    (None: as many as fill the SMs); own contexts from one token past the prefix to many blocks."""
    lens = [1100, 700, 1300, 1025, 2000] * 14 if ON_CUDA else [100, 70, 200, 37, 150]
    b = make_batch([(1, n) for n in lens], num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=8)
    prefix = share_prefix(b, min(lens) // block_size)
    m = b.meta
    out = torch.full_like(b.q, float("nan"))
    shared_prefix_decode(b.q, b.kv_cache, out, m.query_start_loc, m.seq_lens, m.block_tables, prefix, 0.125,
                         sm_count(device), num_splits=num_splits)
    assert_close(out, reference(b, 0.125))


def test_backend_shared_prefix_path(device, assert_close, monkeypatch):
    """Decode-only metadata with a common prefix takes the shared-prefix kernels; graph padding rows
    (context 0) are computed harmlessly."""
    if not ON_CUDA:  # few SMs, so that a small batch is past the split-KV sizes
        monkeypatch.setattr("pagedllm.attention.triton_backend.sm_count", lambda device: 4)
    lens = [900, 400, 1500] * 30 if ON_CUDA else [90, 40, 150] * 3
    b = make_batch([(1, n) for n in lens], 32, 8, 128, 16, BF16, device, seed=9)
    b.meta.common_prefix = share_prefix(b, min(lens) // 16)
    assert not use_split_kv(b.meta, 8, 132 if ON_CUDA else 4)
    out = TritonAttentionBackend().forward(b.q, b.kv_cache, b.meta, 0.1)
    assert_close(out, reference(b, 0.1))
    b.meta.seq_lens[-1] = 0
    padded = TritonAttentionBackend().forward(b.q, b.kv_cache, b.meta, 0.1)
    assert torch.equal(padded[:-1], out[:-1]) and not padded[-1].isnan().any()


def test_split_kv_heuristic():
    def meta(num_decodes: int, num_reqs: int) -> AttentionMetadata:
        t = torch.zeros(1)
        return AttentionMetadata(num_reqs, num_decodes, num_decodes, 1, 100, t, t, t, t, [], [])

    assert split_kv_max_batch(8, 132) == 32 and split_kv_max_batch(3, 132) == 88 and split_kv_max_batch(1, 132) == 256
    assert use_split_kv(meta(1, 1), num_kv_heads=8, num_sms=132)
    assert use_split_kv(meta(32, 32), 8, 132)
    assert not use_split_kv(meta(4, 5), 8, 132)  # a prefill in the batch
    assert not use_split_kv(meta(33, 33), 8, 132)  # enough programs already
    # Decided on graph sizes: 85 decodes (3 KV heads) pad to a graph of 88 and split in both.
    assert use_split_kv(meta(85, 85), 3, 132) and use_split_kv(meta(88, 88), 3, 132)
    assert not use_split_kv(meta(89, 89), 3, 132)


def test_shared_prefix_sizes(monkeypatch):
    """The graph sizes that get a shared-prefix graph: from 64 requests, and past the split-KV sizes (for
    few KV heads those would capture the same kernels twice)."""
    monkeypatch.setattr("pagedllm.attention.triton_backend.sm_count", lambda device: 132)
    backend, cpu = TritonAttentionBackend(), torch.device("cpu")
    assert [s for s in (32, 56, 64, 128, 136) if backend.takes_shared_prefix(s, 8, cpu)] == [64, 128, 136]
    assert [s for s in (64, 128, 136, 256, 272) if backend.takes_shared_prefix(s, 2, cpu)] == [136, 256, 272]
    assert not backend.takes_shared_prefix(256, 1, cpu) and backend.takes_shared_prefix(272, 1, cpu)


def test_backend_attends_after_the_write(device, assert_close):
    """The path the model takes: this step's K/V written into the cache, then attention (mixed batch)."""
    b = make_batch(REQS, 8, 2, 64, 16, BF16, device, seed=3)
    cache = b.kv_cache.clone()
    flat = cache.view(2, -1, *cache.shape[-2:])
    flat[:, b.meta.slot_mapping] = float("nan")  # this step's slots start unwritten
    backend = TritonAttentionBackend()
    write_kv(b.new_k, b.new_v, cache, b.meta.slot_mapping)
    assert torch.equal(cache.nan_to_num(7.0), b.kv_cache.nan_to_num(7.0))
    out = backend.forward(b.q, cache, b.meta, 0.125)
    assert_close(out, reference(b, 0.125))
    # The next layer of the same step reuses the prompt part made for the first.
    part = backend._prompts_of(b.meta)
    assert torch.equal(backend.forward(b.q, cache, b.meta, 0.125), out) and backend._prompts_of(b.meta) is part


def test_backend_split_kv_path(device, assert_close):
    lens = (3000, 1200, 17) if ON_CUDA else (300, 120, 17)
    b = make_batch([(1, n) for n in lens], 32, 8, 128, 16, BF16, device, seed=4)
    assert use_split_kv(b.meta, 8, sm_count(device))
    assert_close(TritonAttentionBackend().forward(b.q, b.kv_cache, b.meta, 0.1), reference(b, 0.1))


# ---- float8 KV cache (--kv-cache-dtype fp8): the same kernels; the cache pointer's type selects float8 loads ----
FP8_CASES = [(32, 8, 128, 16, BF16), (28, 4, 64, 32, F32)] if ON_CUDA else [(8, 2, 64, 16, BF16), (7, 1, 32, 32, F32)]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,dtype", FP8_CASES)
def test_unified_fp8_cache(device, assert_close, num_heads, num_kv_heads, head_dim, block_size, dtype):
    """Mixed batch over a float8 cache, against the float64 reference dequantizing the same cache."""
    b = make_batch(REQS, num_heads, num_kv_heads, head_dim, block_size, dtype, device, kv_scales=FP8_SCALES)
    assert b.kv_cache.dtype == KV_FP8
    m = b.meta
    out = unified_attention(b.q, b.kv_cache, torch.empty_like(b.q), m.query_start_loc, m.seq_lens, m.block_tables,
                            m.max_query_len, 0.125, **b.scales)
    assert_close(out, reference(b, 0.125))
    with pytest.raises(AssertionError, match="float8"):  # a 16-bit cache has no scales
        unified_attention(b.q, b.kv_cache.to(dtype), out, m.query_start_loc, m.seq_lens, m.block_tables, 1, 0.125,
                          k_scale=2.0)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_split_kv_decode_fp8_cache(device, assert_close, dtype):
    lens, num_parts = ((0, 40, 300, 4000), 16) if ON_CUDA else ((0, 40, 100, 300), 3)
    b = make_batch([(1, n) for n in lens], 8, 2, 64, 16, dtype, device, seed=2, kv_scales=FP8_SCALES)
    m = b.meta
    out = split_kv_decode(b.q, b.kv_cache, torch.full_like(b.q, float("nan")), m.seq_lens, m.block_tables, 0.125,
                          num_parts=num_parts, **b.scales)
    assert_close(out, reference(b, 0.125))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_shared_prefix_decode_fp8_cache(device, assert_close, num_splits):
    lens = [1100, 700, 1300, 1025, 2000] * 14 if ON_CUDA else [100, 70, 200, 37, 150]
    b = make_batch([(1, n) for n in lens], 8, 2, 64, 16, BF16, device, seed=8, kv_scales=FP8_SCALES)
    prefix = share_prefix(b, min(lens) // 16)
    m = b.meta
    out = shared_prefix_decode(b.q, b.kv_cache, torch.full_like(b.q, float("nan")), m.query_start_loc, m.seq_lens,
                               m.block_tables, prefix, 0.125, sm_count(device), num_splits=num_splits, **b.scales)
    assert_close(out, reference(b, 0.125))


@pytest.mark.parametrize("path", ["mixed", "split-kv", "shared-prefix"])
def test_backend_fp8_cache(device, assert_close, monkeypatch, path):
    """Through the backend, each path: this step's K/V written into the float8 cache (the torch write, quantizing
    with the scales to the same bits the batch was made with), then attention with the scales."""
    num_sms = 4 if path == "shared-prefix" and not ON_CUDA else sm_count(device)  # few SMs: past the split-KV sizes
    monkeypatch.setattr("pagedllm.attention.triton_backend.sm_count", lambda device: num_sms)
    reqs = {"mixed": REQS, "split-kv": [(1, n) for n in (300, 120, 17)],
            "shared-prefix": [(1, n) for n in ([900, 400, 1500] * 30 if ON_CUDA else [90, 40, 150] * 3)]}[path]
    b = make_batch(reqs, 16, 4, 64, 16, BF16, device, seed=3, kv_scales=FP8_SCALES)
    if path == "shared-prefix":
        b.meta.common_prefix = share_prefix(b, min(n for _, n in reqs) // 16)
    assert use_split_kv(b.meta, 4, num_sms) == (path == "split-kv")
    cache = b.kv_cache.clone()
    cache.view(torch.uint8).view(2, -1, *cache.shape[-2:])[:, b.meta.slot_mapping] = 0x7F  # unwritten: NaN
    k_scale, v_scale = b.kv_scales
    write_kv(b.new_k.float() * k_scale, b.new_v.float() * v_scale, cache, b.meta.slot_mapping, k_scale, v_scale)
    assert torch.equal(cache.view(torch.uint8), b.kv_cache.view(torch.uint8))
    assert_close(TritonAttentionBackend().forward(b.q, cache, b.meta, 0.125, None, k_scale, v_scale), reference(b, 0.125))
