"""Temperature sampling in one pass over the logits (the Gumbel-max trick).

argmax_i(l_i / T + g_i), with g_i = -log(-log u_i) independent Gumbel noise, is a draw from
softmax(l / T). So no softmax, no float32 copy of the [B, V] logits and no [B, V] noise tensor are
made (together ~10 passes over B x V float32 values in the torch path): each program reads a slice
of a row once, in its own dtype, draws Philox noise in registers (four uniforms per Philox call),
and keeps its best (score, index); a small torch reduction then picks each row's winner over the
slices. A row with noise scale 0 is a greedy row: the plain argmax of its logits (ties to the lowest
index, as torch.argmax).

Each row has its own Philox seed and the counter is the column, so a row's noise depends on its
seed alone, never on the batch around it (seeded requests draw their seed from their own generator).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import uint_to_uniform_float

from pagedllm.kernels import sm_count

_BLOCK = 1024  # columns per iteration: four quarters, one per Philox output
_MIN_U = 1e-20  # u = 0 would give g = -inf, and 0 * -inf = NaN in a greedy row
_NO_INDEX = 2147483647


@triton.jit
def _best_of_quarter(best_v, best_i, base, cols, end, bits, inv_t, noise, MIN_U: tl.constexpr):
    ok = cols < end
    x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32)
    u = tl.maximum(uint_to_uniform_float(bits), MIN_U)
    score = x * inv_t - noise * tl.log(-tl.log(u))
    take = ok & (score > best_v)  # strictly: the first of equal scores stays
    return tl.where(take, score, best_v), tl.where(take, cols, best_i)


@triton.jit(do_not_specialize=["stride_row", "vocab", "slice_len", "num_slices"])
def _gumbel_max_kernel(
    logits_ptr, inv_temp_ptr, noise_ptr, seed_ptr, best_val_ptr, best_idx_ptr,
    stride_row, vocab, slice_len, num_slices, BLOCK: tl.constexpr, MIN_U: tl.constexpr, NO_INDEX: tl.constexpr,
):
    row = tl.program_id(0)
    part = tl.program_id(1)
    inv_t = tl.load(inv_temp_ptr + row)
    noise = tl.load(noise_ptr + row)
    seed = tl.load(seed_ptr + row)
    start = part * slice_len
    end = tl.minimum(start + slice_len, vocab)
    QUARTER: tl.constexpr = BLOCK // 4
    best_v = tl.full([QUARTER], float("-inf"), tl.float32)
    best_i = tl.full([QUARTER], NO_INDEX, tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride_row
    lanes = tl.arange(0, QUARTER)
    for off in range(start, end, BLOCK):
        # Column off + j * QUARTER + i takes output j of Philox counter off / 4 + i: one draw per column.
        r0, r1, r2, r3 = tl.randint4x(seed, off // 4 + lanes)
        best_v, best_i = _best_of_quarter(best_v, best_i, base, off + lanes, end, r0, inv_t, noise, MIN_U)
        best_v, best_i = _best_of_quarter(best_v, best_i, base, off + QUARTER + lanes, end, r1, inv_t, noise, MIN_U)
        best_v, best_i = _best_of_quarter(best_v, best_i, base, off + 2 * QUARTER + lanes, end, r2, inv_t, noise, MIN_U)
        best_v, best_i = _best_of_quarter(best_v, best_i, base, off + 3 * QUARTER + lanes, end, r3, inv_t, noise, MIN_U)
    top = tl.max(best_v, 0)
    idx = tl.min(tl.where(best_v == top, best_i, NO_INDEX), 0)
    tl.store(best_val_ptr + row * num_slices + part, top)
    tl.store(best_idx_ptr + row * num_slices + part, idx)


def gumbel_max_sample(logits: torch.Tensor, inv_temperature: torch.Tensor, noise: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (any float dtype, unit column stride); inv_temperature and noise [B] float32 (noise
    1 for a random row, 0 for a greedy one); seeds [B] int64, each row's Philox seed. Returns ids [B] int64."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1
    # Enough programs for ~2 waves over the SMs, in slices of whole blocks.
    num_slices = max(1, min(triton.cdiv(vocab, _BLOCK), triton.cdiv(2 * sm_count(logits.device), max(rows, 1))))
    slice_len = triton.cdiv(triton.cdiv(vocab, num_slices), _BLOCK) * _BLOCK
    num_slices = triton.cdiv(vocab, slice_len)
    best_val = torch.empty(rows, num_slices, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(rows, num_slices, dtype=torch.int32, device=logits.device)
    if rows:
        _gumbel_max_kernel[(rows, num_slices)](
            logits, inv_temperature, noise, seeds, best_val, best_idx, logits.stride(0), vocab, slice_len, num_slices,
            BLOCK=_BLOCK, MIN_U=_MIN_U, NO_INDEX=_NO_INDEX, num_warps=4,
        )
    winner = best_val.argmax(dim=1, keepdim=True)  # the first slice holding the row's best score
    return best_idx.gather(1, winner).view(-1).long()
