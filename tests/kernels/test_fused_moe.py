"""The fused MoE kernel against the per-expert torch loop (`fused_moe_ref`, the CPU path), on fresh random inputs:
token counts 1..4096 (up to 64 under the interpreter), top-k 1/2/8, 8..128 experts, float32 and bf16, ragged
hidden and intermediate sizes (masked K and N tiles), every tile height; and `align`'s sorted, padded layout."""

import os

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.kernels.fused_moe import align, fused_moe, fused_moe_ref, max_blocks, route  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


def _inputs(tokens: int, experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(device, dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) / inter**0.5).to(device, dtype)
    weights, ids = route(torch.randn(tokens, experts, generator=g).to(device), top_k, renormalize=seed % 2 == 0)
    return x, w13, w2, weights, ids


# (tokens, experts, top_k, hidden, intermediate); the interpreter runs the first group only
SMALL = [(1, 8, 2, 64, 32), (3, 128, 8, 64, 32), (17, 8, 1, 80, 48), (64, 16, 2, 64, 32), (40, 64, 8, 64, 48)]
LARGE = [(n, e, k, 2048, 768) for n, e, k in ((1, 128, 8), (16, 128, 8), (256, 128, 8), (4096, 128, 8))] + [
    (n, 8, 2, 4096, 14336 // 8) for n in (1, 7, 512, 4096)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SMALL + ([] if INTERP else LARGE), ids=lambda s: "t{}e{}k{}h{}i{}".format(*s))
def test_fused_moe(device, assert_close, shape, dtype):
    tokens, experts, top_k, hidden, inter = shape
    x, w13, w2, weights, ids = _inputs(tokens, experts, top_k, hidden, inter, dtype, device, sum(shape))
    ref = fused_moe_ref(x.double(), w13.double(), w2.double(), weights.double(), ids)
    assert_close(fused_moe(x, w13, w2, weights, ids), ref, interp_bound=3e-2)  # bf16: silu, product and output


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_tile_configs(device, assert_close, block_m):
    """Every tile height (more padding per expert), narrow N tiles and a K step shorter than the rows."""
    x, w13, w2, weights, ids = _inputs(33, 8, 2, 64, 48, torch.float32, device, block_m)
    config = dict(BLOCK_M=block_m, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=2)
    ref = fused_moe_ref(x.double(), w13.double(), w2.double(), weights.double(), ids)
    assert_close(fused_moe(x, w13, w2, weights, ids, config=config), ref)


@pytest.mark.parametrize("tokens, experts, top_k, block_m", [(1, 128, 8, 16), (50, 8, 2, 16), (300, 16, 4, 64)])
def test_align(tokens, experts, top_k, block_m):
    """Each (token, slot) entry once, in its expert's run of whole blocks; padding and unused blocks marked."""
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    entries = tokens * top_k
    sorted_ids, block_expert = align(ids, experts, block_m)
    assert block_expert.numel() == max_blocks(entries, experts, block_m)
    real = sorted_ids[sorted_ids < entries].long()
    assert sorted(real.tolist()) == list(range(entries))
    per_row_expert = block_expert.repeat_interleave(block_m)
    used = sorted_ids < entries
    assert (per_row_expert[used] == ids.reshape(-1)[sorted_ids[used].long()]).all()
    used_blocks = int((block_expert >= 0).sum())
    assert (block_expert[:used_blocks] >= 0).all() and (block_expert[used_blocks:] == -1).all()
    assert used_blocks == sum(-(-int(c) // block_m) for c in torch.bincount(ids.reshape(-1), minlength=experts))
