"""The integer-weight (W4A16 / W8A16) GEMV variant and GEMM against int_utils' reference product in float64.

Weights come from int_utils.quantize + pack on fresh random floats; the scales are rounded to x's dtype first (the
kernels take them so), and the reference dequantizes those same codes, scales and zeros, so only the kernels' sums
and the rounding of dequantized weights to x's dtype (the GEMM's and multi-row GEMV's dot operands) differ."""

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.kernels import group_mode  # noqa: E402
from pagedllm.kernels.gemv import gemv  # noqa: E402
from pagedllm.kernels.int_gemm import int_gemm, int_linear_cuda  # noqa: E402
from pagedllm.quantization import int_utils as iu  # noqa: E402


def _weight(n: int, k: int, bits: int, group_size: int, dtype: torch.dtype, device, seed: int, symmetric: bool
            ) -> iu.IntWeight:
    g = torch.Generator().manual_seed(seed)
    codes, scales, zeros = iu.quantize(torch.randn(n, k, generator=g) / k**0.5, bits, group_size, symmetric)
    return iu.IntWeight(iu.pack(codes, bits).to(device), scales.to(device, dtype), zeros.to(device), bits,
                        group_size, k)


def _check(device, assert_close, rows: int, n: int, k: int, bits: int, group_size: int, dtype: torch.dtype,
           bias: bool, kernel: str, config=None, symmetric: bool = False) -> None:
    seed = rows * 131 + n * 7 + k + bits + group_size
    w = _weight(n, k, bits, group_size, dtype, device, seed, symmetric)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(rows, k, generator=g).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    ref = iu.int_linear(x.double(), w, None if b is None else b.double())
    if kernel == "gemv":
        out = gemv(x, w.packed, b, config=config, int_weight=(w.scales, w.zeros, bits, group_size))
    elif kernel == "gemm":
        out = int_gemm(x, w.packed, w.scales, w.zeros, bits, group_size, b, config=config)
    else:
        out = int_linear_cuda(x, w.packed, w.scales, w.zeros, bits, group_size, k, b)
    assert out.dtype == dtype
    assert_close(out, ref, interp_bound=2e-2)  # the interpreter truncates to bf16: dot operands and results


# (K, group size): groups of 32 and 128, per channel, and a partial last group (K = 192 in groups of 128)
GROUPS = [(256, 32), (256, 128), (192, 192), (192, 128)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kg", GROUPS, ids=lambda kg: f"k{kg[0]}g{kg[1]}")
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int_gemv(device, assert_close, bits, kg, rows, dtype):
    """N = 40 is not a multiple of the tile's outputs; bias on every other case."""
    k, group = kg
    _check(device, assert_close, rows, 40, k, bits, group, dtype, (rows + bits) % 2 == 1, "gemv")


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("config", [(16, 32, 4, 3, 3), (8, 64, 4, 3, 1), (16, 256, 4, 3, 1)],
                         ids=["splits", "bk64", "bk256"])
@pytest.mark.parametrize("kg", [(192, 128), (256, 32), (192, 48)], ids=lambda kg: f"k{kg[0]}g{kg[1]}")
def test_int_gemv_tiles(device, assert_close, rows, config, kg):
    """Tiles inside a group, of several whole groups, astride groups (48: gathered scales) and split inputs."""
    k, group = kg
    _check(device, assert_close, rows, 24, k, 4, group, torch.bfloat16, True, "gemv", config=config)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kg", GROUPS, ids=lambda kg: f"k{kg[0]}g{kg[1]}")
@pytest.mark.parametrize("rows", [17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int_gemm(device, assert_close, bits, kg, rows, dtype):
    k, group = kg
    config = (32, 32, 64, 4, 3, 1)  # small tiles, so the interpreter's rows, columns and K have edges
    _check(device, assert_close, rows, 72, k, bits, group, dtype, rows == 17, "gemm", config=config)


@pytest.mark.parametrize("config", [(16, 32, 32, 4, 3, 3), (32, 16, 128, 4, 3, 1), (64, 64, 64, 4, 3, 2)],
                         ids=["splits3", "bk128", "splits2"])
@pytest.mark.parametrize("kg", [(192, 128), (256, 32), (192, 48)], ids=lambda kg: f"k{kg[0]}g{kg[1]}")
def test_int_gemm_tiles(device, assert_close, config, kg):
    """Split inputs (partial sums, bias added after them), several groups per tile, gathered scales."""
    k, group = kg
    _check(device, assert_close, 20, 40, k, 4, group, torch.bfloat16, True, "gemm", config=config)


@pytest.mark.parametrize("rows", [2, 33])
def test_int_linear_cuda(device, assert_close, rows):
    """The dispatcher (GEMV up to 16 rows, GEMM beyond) with its own configs, symmetric codes, fp16."""
    _check(device, assert_close, rows, 48, 256, 4, 128, torch.float16, True, "dispatch", symmetric=True)


def test_group_mode():
    assert group_mode(4096, 4096, 128) == (1 << 30, 0)  # per channel: one variant for every K
    assert group_mode(192, 128, 64) == (128, 0)
    assert group_mode(256, 32, 128) == (32, 1)
    assert group_mode(192, 48, 64) == (48, 2)
