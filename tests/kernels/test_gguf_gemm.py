"""The GGUF GEMV and GEMM (pagedllm/kernels/gguf_gemm.py) against x @ gguf.quants.dequantize(blocks).T in float64.

Blocks are random valid ones of each type (gguf.quants cannot quantize K-quants), so every code, scale and min bit
pattern appears; the reference dequantizes them with the gguf package itself, independent of our torch reference."""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
gguf_quants = pytest.importorskip("gguf.quants")

from pagedllm.kernels.gguf_gemm import gguf_gemm, gguf_gemv, gguf_linear_cuda  # noqa: E402
from pagedllm.quantization import gguf as g  # noqa: E402

TYPES = [g.Q4_0, g.Q4_1, g.Q8_0, g.Q4_K, g.Q5_K, g.Q6_K]


def _case(device, rows: int, n: int, k: int, qtype: int, dtype: torch.dtype, bias: bool):
    seed = rows * 131 + n * 7 + k + qtype
    raw = g.random_blocks(qtype, n, k, torch.Generator().manual_seed(seed))
    w = torch.from_numpy(gguf_quants.dequantize(raw.numpy(), qtype).astype(np.float64))
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) * 0.1 if bias else None
    ref = x.double() @ w.T + (0 if b is None else b.double())
    return x.to(device), raw.to(device), None if b is None else b.to(device), ref


def _run(device, assert_close, kernel, rows, n, k, qtype, dtype=torch.bfloat16, bias=False, config=None, out=None):
    x, raw, b, ref = _case(device, rows, n, k, qtype, dtype, bias)
    if kernel == "gemv":
        got = gguf_gemv(x, raw, qtype, b, config=config)
    elif kernel == "gemm":
        got = gguf_gemm(x, raw, qtype, b, config=config)
    else:
        got = gguf_linear_cuda(x, raw, qtype, k, b, out=out)
    assert got.dtype == dtype
    assert_close(got, ref, interp_bound=2e-2)  # the interpreter truncates to bf16: dot operands and results
    return got, ref


# N = 40: not a multiple of the tiles' outputs; K = 512: 2 K-quant blocks, 16 of the others
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: g.NAMES[t])
@pytest.mark.parametrize("rows", [1, 3])
def test_gguf_gemv(device, assert_close, qtype, rows):
    """One row (FMAs) and three (the dot), tiles of 256 columns: one K-quant block, eight Q4_0 blocks."""
    _run(device, assert_close, "gemv", rows, 40, 512, qtype, bias=rows == 3, config=(16, 256, 4, 3, 1))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: g.NAMES[t])
def test_gguf_gemm(device, assert_close, qtype):
    """17 rows over 16-row tiles (an M edge), 32-output tiles over 40 (an N edge), bias."""
    _run(device, assert_close, "gemm", 17, 40, 512, qtype, bias=True, config=(16, 32, 256, 4, 3, 1))


@pytest.mark.parametrize("qtype", [g.Q4_0, g.Q6_K], ids=lambda t: g.NAMES[t])
@pytest.mark.parametrize("kernel, config", [("gemv", (8, 256, 4, 3, 3)), ("gemm", (16, 16, 256, 4, 3, 2)),
                                            ("gemv", (8, 512, 4, 3, 1))], ids=["gemv-splits", "gemm-splits", "ragged"])
def test_gguf_tiles(device, assert_close, qtype, kernel, config):
    """Splits of the input width (partial sums, the bias added after them) and a tile past K (768 columns in tiles
    of 512: blocks past the row read as zeros), fp32 rows."""
    rows = 2 if kernel == "gemv" else 20
    _run(device, assert_close, kernel, rows, 24, 768, qtype, dtype=torch.float32, bias=True, config=config)


def test_gguf_linear_cuda_into_a_column_slice(device, assert_close):
    """The dispatcher with its own configs (GEMV for 2 rows, GEMM for 33), writing a fused layer's part: a column
    slice of a wider output, the columns around it untouched."""
    for rows in (2, 33):
        wide = torch.full((rows, 64), 7.0, device=device, dtype=torch.float16)
        _, ref = _run(device, assert_close, "dispatch", rows, 24, 256, g.Q4_K, torch.float16, True,
                      out=wide[:, 16:40])
        assert torch.all(wide[:, :16] == 7) and torch.all(wide[:, 40:] == 7)
        assert_close(wide[:, 16:40], ref, interp_bound=2e-2)


def test_block_formats_are_complete():
    from pagedllm.kernels.gguf_gemm import _SHAPES

    for qtype, (gpb, l, h) in _SHAPES.items():
        assert gpb * l * h == g.BLOCKS[qtype][0], g.NAMES[qtype]
