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
