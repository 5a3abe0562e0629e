"""Triton kernels, each with a torch reference beside it (tests/kernels checks one against the other)."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> tuple[str, bool]:
    """(input_precision, upcast) for `tile_dot`: fp32 needs IEEE products (TF32 would miss 1e-4), and
    the CPU interpreter mis-multiplies bf16 operands, so there they are upcast to fp32 first."""
    if dtype == torch.float32:
        return "ieee", False
    return ("ieee", True) if interpreting() else ("tf32", False)


@triton.jit
def to_fp8(x, EXACT: tl.constexpr):
    """fp32 x within +-448 -> float8e4nv, to nearest even. EXACT (for the interpreter, whose float8 cast rounds ties
    away from zero and loses the carry into the exponent, e.g. 124.5 -> 64): x is first rounded to the e4m3 grid in
    fp32 (normals: 3 mantissa bits, by integer rounding of the bits; subnormals: steps of 2**-9, by adding and removing
    1.5 * 2**14, whose ulp that is, to |x|), so the cast itself is exact."""
    if EXACT:
        bits = x.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
        sub = (tl.abs(x) + 24576.0) - 24576.0
        x = tl.where(tl.abs(x) < 0.015625, tl.where(x < 0, -sub, sub), normal)
    return x.to(tl.float8e4nv)


@triton.jit
def tile_dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 132 (an H100 SXM) elsewhere, for interpreter runs."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


@functools.cache
def pdl_options(device: torch.device) -> dict[str, bool]:
    """Launch options for programmatic dependent launch (Hopper and later; PAGEDLLM_PDL=0 turns it off).

    A kernel launched so may be scheduled while the kernel before it drains, instead of after it
    has finished: at decode sizes most of a small kernel's few microseconds are that start. Every
    kernel given these options runs `pdl_prologue` first, which waits until the kernel before it
    has finished and its writes are visible, then lets the next one be scheduled."""
    on = (
        device.type == "cuda"
        and not interpreting()
        and os.environ.get("PAGEDLLM_PDL", "1") != "0"
        and torch.cuda.get_device_capability(device)[0] >= 9
    )
    return {"USE_PDL": on, "launch_pdl": on}


@triton.jit
def pdl_prologue(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # nothing is read or written before the kernel before this one is done
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile program_id(0) of the GEMMs: GROUP_M consecutive programs share an N column,
    so its weight tiles are read from memory once per group of M tiles (and stay in L2 meanwhile)."""
    t = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (t // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (t % per_group) % group_rows, (t % per_group) // group_rows


# 2**23 as a float32's bits: OR-ing a code below 2**23 into its mantissa gives the float 2**23 + code exactly, a
# bitwise op and a later subtraction instead of an int -> float conversion (a quarter-rate instruction on the GPU)
_MAGIC = tl.constexpr(0x4B000000)


@triton.jit
def dequantize_tile(words, s_ptr, z_ptr, rows, groups, k0, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                    GROUP_MODE: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 weights [R, BLOCK_K] from `words` [R, BLOCK_K * BITS / 32] int32, the packed codes of weight rows
    `rows` ([R], in range) at input columns k0.. (pagedllm/quantization/int_utils.py's layout; scales and zeros
    [N, groups], contiguous): w = (q - zero) * scale.

    GROUP_MODE says how the tile meets the groups: 0, all of it in group k0 // GROUP_SIZE (one scale per row: the
    host picks BLOCK_K dividing the group, or GROUP_SIZE past K for per-channel weights); 1, BLOCK_K / GROUP_SIZE whole
    groups (the codes viewed as [R, groups in the tile, GROUP_SIZE], a scale per row and group); 2, anything else
    (a scale gathered per column). Groups past the last (columns past K, whose rows are zeros) read scale 0."""
    PER: tl.constexpr = 32 // BITS
    R: tl.constexpr = words.shape[0]
    codes = (words[:, :, None] >> (tl.arange(0, PER) * BITS)[None, None, :]) & ((1 << BITS) - 1)
    # [R, BLOCK_K / PER, PER]: code k of the tile at [k // PER, k % PER], as 2**23 + code
    q = (codes | _MAGIC).to(tl.float32, bitcast=True)
    base = rows.to(tl.int64) * groups
    if GROUP_MODE == 0:
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + base + g).to(tl.float32)
        z = tl.load(z_ptr + base + g).to(tl.float32) + 8388608.0
        return (tl.reshape(q, [R, BLOCK_K]) - z[:, None]) * s[:, None]
    elif GROUP_MODE == 1:
        NG: tl.constexpr = BLOCK_K // GROUP_SIZE
        g = k0 // GROUP_SIZE + tl.arange(0, NG)
        ok = (g < groups)[None, :]
        s = tl.load(s_ptr + base[:, None] + g[None, :], mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + base[:, None] + g[None, :], mask=ok, other=0).to(tl.float32) + 8388608.0
        w = (tl.reshape(q, [R, NG, GROUP_SIZE]) - z[:, :, None]) * s[:, :, None]
        return tl.reshape(w, [R, BLOCK_K])
    else:
        g = (k0 + tl.arange(0, BLOCK_K)) // GROUP_SIZE
        ok = (g < groups)[None, :]
        s = tl.load(s_ptr + base[:, None] + g[None, :], mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + base[:, None] + g[None, :], mask=ok, other=0).to(tl.float32) + 8388608.0
        return (tl.reshape(q, [R, BLOCK_K]) - z) * s


def group_mode(k: int, group_size: int, block_k: int) -> tuple[int, int]:
    """(GROUP_SIZE, GROUP_MODE) constexprs of `dequantize_tile` for a [*, k] weight in `group_size` groups read in
    tiles of block_k columns starting at multiples of block_k. One group per row (per channel) becomes a group past any
    column (one compiled variant for every width)."""
    if group_size >= k:
        return 1 << 30, 0
    if group_size % block_k == 0:
        return group_size, 0
    if block_k % group_size == 0:
        return group_size, 1
    return group_size, 2
