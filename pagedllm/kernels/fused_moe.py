"""Fused mixture-of-experts: out[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, j].

Each token's top-k (token, slot) entries are sorted by expert and each expert's run padded to a multiple of BLOCK_M
(`align`), so a block of BLOCK_M sorted rows belongs to one expert. Two grouped GEMMs then run over those blocks:
program (block, N tile) reads its block's rows and only that expert's weight tiles, so a decode step reads just the
selected experts' weights, and blocks past the last used one (the grid is sized for the worst case, so the launch
needs no host sync and can be captured in a CUDA graph) return at once.
  1. gate/up: gate and up tiles of w13 [E, 2I, H] against the gathered x rows, SiLU-and-mul in the epilogue, written
     to a [rows, I] buffer in sorted (padded) order, so the second GEMM reads it contiguously;
  2. down: that buffer against w2 [E, H, I], scaled by the entry's routing weight in the epilogue and written to its
     (token, slot) row of a [T, k, H] buffer, summed over k by torch afterwards (deterministic, unlike atomic adds).
Alignment is a handful of fixed-shape torch ops on the device (a stable sort, scatter-adds, cumsums, a searchsorted):
no `.item()`, no data-dependent shapes.

Tile configs (`moe_config`) are GUESSES until benchmarks/moe_bench.py --sweep fills `TUNED` on the H200.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pagedllm.kernels import dot_precision, pdl_options, pdl_prologue, tile_dot

MoeConfig = dict[str, int]  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages

# (E, N = intermediate per rank, K = hidden, top_k) -> [(up to this many tokens, config)], ascending. Filled from
# sweeps on the H200 (benchmarks/moe_bench.py --sweep prints entries in this form); empty until then.
TUNED: dict[tuple[int, int, int, int], list[tuple[int, MoeConfig]]] = {}


def moe_config(num_tokens: int, num_experts: int, n: int, k: int, top_k: int) -> MoeConfig:
    """Tiles for `num_tokens` tokens through experts of intermediate size n (per rank) and hidden size k: the swept
    entry if there is one, else a guess from the expected rows per expert (num_tokens * top_k / E): 16-row blocks
    at decode sizes (the weight stream dominates and padding rows are wasted compute), growing with the rows."""
    for max_tokens, config in TUNED.get((num_experts, n, k, top_k), []):
        if num_tokens <= max_tokens:
            return config
    rows = num_tokens * top_k / num_experts
    if rows <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    if rows <= 48:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    if rows <= 128:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def max_blocks(entries: int, num_experts: int, block_m: int) -> int:
    """Most BLOCK_M blocks that `entries` sorted entries can fill: each used expert wastes under one block."""
    return triton.cdiv(entries, block_m) + min(num_experts, entries)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids [blocks * block_m] int32, block_expert [blocks] int32) for topk_ids [T, k]: the flat entry indices
    (t * k + j) grouped by expert, each expert's run padded with `entries` (an index past the last) to whole blocks,
    and each block's expert (-1 past the used ones). Entries of id -1 (another rank's expert, under expert
    parallelism) are dropped. Fixed shapes from T alone: no host sync."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    entries, device = flat.numel(), flat.device
    blocks = max_blocks(entries, num_experts, block_m)
    local = flat >= 0
    key = torch.where(local, flat, num_experts)  # dropped entries sort last
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, torch.where(local, flat, 0), local.to(torch.int64))
    expert_blocks = (counts + block_m - 1) // block_m
    block_ends = torch.cumsum(expert_blocks, 0)  # each expert's last block + 1
    run_start = (block_ends - expert_blocks) * block_m  # each expert's first padded row
    first_entry = torch.cumsum(counts, 0) - counts  # of each expert among the sorted entries
    expert_sorted, order = torch.sort(key, stable=True)
    e = expert_sorted.clamp(max=num_experts - 1)
    dest = run_start[e] + torch.arange(entries, device=device) - first_entry[e]
    dest = torch.where(expert_sorted < num_experts, dest, blocks * block_m)  # dropped: into a slot cut off below
    sorted_ids = torch.full((blocks * block_m + 1,), entries, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_expert = torch.searchsorted(block_ends, torch.arange(blocks, device=device), right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_ids[:-1], block_expert


@triton.jit
def _block_tile(N, BLOCK_N: tl.constexpr):
    """(sorted block, N tile) of this program: consecutive programs take one N tile over the blocks, so an expert's
    weight tile stays in L2 while its blocks pass."""
    num_blocks = tl.num_programs(0) // tl.cdiv(N, BLOCK_N)
    return tl.program_id(0) % num_blocks, tl.program_id(0) // num_blocks


@triton.jit(do_not_specialize=["entries"])
def _moe_gate_up_kernel(
    x_ptr, w_ptr, out_ptr, sorted_ptr, expert_ptr, entries, N, K, stride_xm, stride_we, stride_wn, stride_om,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Program (block b, N tile): out[b * BLOCK_M + i, n] = silu(x[t_i] . gate_e[n]) * (x[t_i] . up_e[n])."""
    b, pid_n = _block_tile(N, BLOCK_N)
    pdl_prologue(USE_PDL)
    expert = tl.load(expert_ptr + b)
    if expert < 0:
        return
    rows = tl.load(sorted_ptr + b * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < entries
    tokens = tl.where(valid, rows // TOP_K, 0).to(tl.int64)  # padding rows re-read token 0 and are zeroed below
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_w = tl.where(n < N, n, 0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xm + k[None, :]
    g_ptrs = w_ptr + expert.to(tl.int64) * stride_we + n_w[:, None] * stride_wn + k[None, :]
    u_ptrs = g_ptrs + N * stride_wn  # up rows follow the gate rows
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            ok = (k0 + k)[None, :] < K
            x = tl.load(x_ptrs, mask=ok, other=0.0)
            g = tl.load(g_ptrs, mask=ok, other=0.0)
            u = tl.load(u_ptrs, mask=ok, other=0.0)
        acc_g += tile_dot(x, tl.trans(g), PREC, UPCAST)
        acc_u += tile_dot(x, tl.trans(u), PREC, UPCAST)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    # silu rounded to the output dtype before the product, as eager F.silu(gate) * up in that dtype
    g = acc_g.to(out_ptr.dtype.element_ty).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)
    h = act.to(tl.float32) * acc_u.to(out_ptr.dtype.element_ty).to(tl.float32)
    h = tl.where(valid[:, None], h, 0.0)
    out_rows = (b * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    tl.store(out_ptr + out_rows[:, None] * stride_om + n[None, :], h.to(out_ptr.dtype.element_ty), mask=(n < N)[None, :])


@triton.jit(do_not_specialize=["entries"])
def _moe_down_kernel(
    a_ptr, w_ptr, out_ptr, sorted_ptr, expert_ptr, topk_w_ptr, entries, N, K, stride_am, stride_we, stride_wn,
    stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Program (block b, N tile): out[entry_i, n] = w[entry_i] * (a[b * BLOCK_M + i] . down_e[n])."""
    b, pid_n = _block_tile(N, BLOCK_N)
    pdl_prologue(USE_PDL)
    expert = tl.load(expert_ptr + b)
    if expert < 0:
        return
    rows = tl.load(sorted_ptr + b * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < entries
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_w = tl.where(n < N, n, 0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (b * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None] * stride_am + k[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + n_w[:, None] * stride_wn + k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            ok = (k0 + k)[None, :] < K
            a = tl.load(a_ptrs, mask=ok, other=0.0)
            w = tl.load(w_ptrs, mask=ok, other=0.0)
        acc += tile_dot(a, tl.trans(w), PREC, UPCAST)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    scale = tl.load(topk_w_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    # rounded to the output dtype before the scaling, as the reference's down projection is
    acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32) * scale[:, None]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (n < N)[None, :])


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: MoeConfig | None = None, partial: bool = False) -> torch.Tensor:
    """x [T, H] through experts w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I], each token through its
    topk_ids [T, k] experts weighted by topk_weights [T, k]: [T, H] in x's dtype. `config`: tiles instead of
    `moe_config`'s (sweeps). `partial`: topk_ids may hold -1 (an expert of another rank), entries that add nothing."""
    tokens, hidden = x.shape
    num_experts, inter = w2.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    assert w13.shape == (num_experts, 2 * inter, hidden) and x.stride(1) == 1
    assert w13.stride(2) == 1 and w2.stride(2) == 1
    out = (torch.zeros if partial else torch.empty)(tokens, top_k, hidden, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out.sum(1)
    cfg = config or moe_config(tokens, num_experts, inter, hidden, top_k)
    if x.element_size() == 4:  # float32 tiles take twice the shared memory: fewer stages in flight (H100: 227 KiB)
        cfg = {**cfg, "num_stages": min(cfg["num_stages"], 2)}
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    sorted_ids, block_expert = align(topk_ids, num_experts, bm)
    blocks = block_expert.numel()
    act = torch.empty(blocks * bm, inter, dtype=x.dtype, device=x.device)
    prec, upcast = dot_precision(x.dtype)
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], PREC=prec, UPCAST=upcast,
                  **pdl_options(x.device))
    bk1 = max(16, min(bk, triton.next_power_of_2(hidden)))
    _moe_gate_up_kernel[(blocks * triton.cdiv(inter, bn),)](
        x, w13, act, sorted_ids, block_expert, tokens * top_k, inter, hidden, x.stride(0), w13.stride(0),
        w13.stride(1), act.stride(0), TOP_K=top_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk1, EVEN_K=hidden % bk1 == 0,
        **launch,
    )
    bk2 = max(16, min(bk, triton.next_power_of_2(inter)))
    flat_out = out.view(tokens * top_k, hidden)
    _moe_down_kernel[(blocks * triton.cdiv(hidden, bn),)](
        act, w2, flat_out, sorted_ids, block_expert, topk_weights.reshape(-1).float().contiguous(), tokens * top_k,
        hidden, inter, act.stride(0), w2.stride(0), w2.stride(1), flat_out.stride(0), BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk2, EVEN_K=inter % bk2 == 0, **launch,
    )
    return out[:, 0] if top_k == 1 else out.sum(1)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 [T, k], expert ids [T, k]): softmax over all experts in float32, the top k, divided by their
    sum where `renormalize` (Mixtral always; Qwen's norm_topk_prob), the order transformers computes them in."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """`fused_moe` in torch, the CPU path: a loop over the experts that got tokens, in ascending order, each adding
    its weighted output into its tokens' rows. transformers' sums, in its order (float32 results bit-equal).
    Ids of -1 (experts of other ranks) add nothing."""
    out = torch.zeros_like(x)
    for expert in topk_ids.unique().tolist():
        if expert < 0:
            continue
        tokens, slots = torch.where(topk_ids == expert)
        gate, up = F.linear(x[tokens], w13[expert]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, w2[expert]) * topk_weights[tokens, slots, None]
        out.index_add_(0, tokens, h.to(out.dtype))
    return out
