"""Per-query key limits (Gemma 3's bidirectional images, AttentionMetadata.key_limits) in the unified kernel, the
Triton backend's mixed-batch path and the torch backend, against the float64 reference: random limits (each at or
past its query's position, up to its sequence's end) and image-like spans, in fresh prompts and chunks with cached
context, with sliding windows shorter and longer than the spans. Limits equal to the positions give the causal
kernel's result bit for bit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from pagedllm.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from pagedllm.kernels.paged_attention import paged_attention_ref, unified_attention  # noqa: E402
from tests.kernels.test_attention_options import REQS, drop_outside_window  # noqa: E402
from tests.kernels.test_paged_attention import BF16, F32, Batch, make_batch  # noqa: E402

WINDOWS = [None, 5, 16, 37]


def positions(b: Batch) -> torch.Tensor:
    m = b.meta
    return torch.cat([torch.arange(s - (e - a), s) for a, e, s in
                      zip(m.query_start_loc_cpu, m.query_start_loc_cpu[1:], m.seq_lens_cpu)])


def random_limits(b: Batch, seed: int) -> torch.Tensor:
    """int32 [T]: decodes see up to themselves; a prompt chunk's queries half at their position, half at a random
    later key of the chunk, and one image-like span (its queries all at its last token)."""
    g = torch.Generator().manual_seed(seed)
    m, pos = b.meta, positions(b)
    limits = pos.clone()
    for r in range(m.num_decodes, m.num_reqs):
        a, e, seq_len = m.query_start_loc_cpu[r], m.query_start_loc_cpu[r + 1], m.seq_lens_cpu[r]
        reach = (torch.rand(e - a, generator=g) * (seq_len - pos[a:e])).long()
        limits[a:e] += torch.where(torch.rand(e - a, generator=g) < 0.5, reach, 0)
        lo = int(torch.randint(a, e, (1,), generator=g))
        hi = min(e, lo + 12)
        limits[lo:hi] = pos[hi - 1]
    assert (limits >= pos).all()
    return limits.to(torch.int32)


def reference(b: Batch, scale: float, window: int | None, limits: torch.Tensor | None,
              cap: float | None = None) -> torch.Tensor:
    m = b.meta
    return paged_attention_ref(b.q, b.kv_cache.nan_to_num(0.0), m.query_start_loc_cpu, m.seq_lens_cpu,
                               m.block_tables, scale, sliding_window=window, soft_cap=cap,
                               key_limits=None if limits is None else limits.cpu())


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("dtype,block_m", [(F32, None), (BF16, None), (F32, 16)])
def test_unified(device, assert_close, window, dtype, block_m):
    """Prompt chunks only (the backend sends decodes to their own launch)."""
    b = make_batch([r for r in REQS if r[0] > 1], 4, 2, 32, 16, dtype, device, seed=21)
    drop_outside_window(b, window)
    m = b.meta
    limits = random_limits(b, seed=22).to(device)
    out = unified_attention(b.q, b.kv_cache, torch.empty_like(b.q), m.query_start_loc, m.seq_lens, m.block_tables,
                            m.max_query_len, 0.2, block_m=block_m, sliding_window=window, key_limits=limits)
    assert_close(out, reference(b, 0.2, window, limits))
    # Limits at the queries' own positions: the causal kernel's result, bit for bit
    causal = unified_attention(b.q, b.kv_cache, torch.empty_like(b.q), m.query_start_loc, m.seq_lens, m.block_tables,
                               m.max_query_len, 0.2, block_m=block_m, sliding_window=window)
    same = unified_attention(b.q, b.kv_cache, torch.empty_like(b.q), m.query_start_loc, m.seq_lens, m.block_tables,
                             m.max_query_len, 0.2, block_m=block_m, sliding_window=window,
                             key_limits=positions(b).to(device, torch.int32))
    assert torch.equal(same, causal)


@pytest.mark.parametrize("window,cap", [(None, None), (16, 2.0)])
def test_backends_mixed_batch(device, assert_close, window, cap):
    """Decodes and prompt chunks in one step through the Triton backend (limits sliced for the prompts' launch) and
    the torch backend."""
    b = make_batch(REQS, 4, 2, 32, 16, F32, device, seed=23)
    b.meta.key_limits = random_limits(b, seed=24).to(device)
    expected = reference(b, 0.2, window, b.meta.key_limits, cap)
    out = TritonAttentionBackend().forward(b.q, b.kv_cache, b.meta, 0.2, sliding_window=window, soft_cap=cap)
    assert_close(out, expected)
    b.kv_cache = b.kv_cache.cpu().nan_to_num(0.0)  # the torch backend masks after gathering whole blocks
    b.meta = _on_cpu(b.meta)
    out = TorchAttentionBackend().forward(b.q.cpu(), b.kv_cache, b.meta, 0.2, sliding_window=window, soft_cap=cap)
    assert_close(out, expected)


def _on_cpu(meta):  # type: ignore[no-untyped-def]
    from dataclasses import fields, replace

    return replace(meta, **{f.name: getattr(meta, f.name).cpu() for f in fields(meta)
                            if isinstance(getattr(meta, f.name), torch.Tensor)})


def test_engine_gemma3_images(device, tmp_path):
    """The engine on the tiny Gemma 3 (tests/test_gemma3_images.py) through the Triton backend, in 20-token steps
    mixing decodes with prompt chunks: transformers' prompt ids, tokens and prompt logprobs."""
    pytest.importorskip("PIL")
    from pagedllm import LLM
    from tests.reference.gemma3_mm import make_tiny_gemma3_mm
    from tests.test_gemma3_images import ARGS, _generate, _prompt_logprobs, hf_run, workload

    path = make_tiny_gemma3_mm(str(tmp_path / "gemma3_mm"))
    work = workload()
    llm = LLM(path, **ARGS, device=device.type, attention_backend="triton", max_num_batched_tokens=20, max_num_seqs=4)
    for output, (prompt, images, max_tokens) in zip(_generate(llm, work, prompt_logprobs=True), work):
        ids, tokens, bidirectional, _ = hf_run(path, prompt, images, max_tokens)
        assert list(output.prompt_token_ids) == ids and list(output.outputs[0].token_ids) == tokens
        torch.testing.assert_close(_prompt_logprobs(output), bidirectional, atol=1e-4 if device.type == "cpu" else 1e-3,
                                   rtol=0)
