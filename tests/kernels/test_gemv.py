import pytest
import torch

pytest.importorskip("triton")

from pagedllm.kernels.gemv import gemv  # noqa: E402
from pagedllm.layers.linear import GEMV_MAX_ROWS  # noqa: E402

ON_CUDA = torch.cuda.is_available()
# (N, K): Llama-3-8B's qkv, Qwen3-0.6B's o (narrow: its input width is split) and a ragged one on the GPU;
# small, ragged and uneven-K ones under the interpreter
SHAPES = [(6144, 4096), (1024, 2048), (1000, 576)] if ON_CUDA else [(64, 128), (40, 96), (33, 200)]


def _check_gemv(device, assert_close, dtype, rows, shape, bias, column_major, config=None) -> None:
    n, k = shape
    g = torch.Generator().manual_seed(rows * 7 + n)
    x = torch.randn(rows, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
    if column_major:  # the kernel takes either layout (the model gives it row-major weights only)
        w = w.t().contiguous().t()
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    assert_close(gemv(x, w, b, config=config), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", sorted({1, 2, GEMV_MAX_ROWS}))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("column_major", [False, True], ids=["rowmajor", "colmajor"])
def test_gemv(device, assert_close, dtype, rows, shape, bias, column_major):
    _check_gemv(device, assert_close, dtype, rows, shape, bias, column_major)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("column_major", [False, True], ids=["rowmajor", "colmajor"])
def test_gemv_split_inputs(device, assert_close, dtype, rows, column_major):
    """The input width cut in 3 splits, whose float32 partial sums a second kernel adds."""
    _check_gemv(device, assert_close, dtype, rows, SHAPES[-1], True, column_major, config=(16, 32, 4, 3, 3))


def test_gemv_strided_rows(device, assert_close):
    """Rows of a wider buffer (a stride above K), written into rows of a wider output."""
    x = torch.randn(3, 160, device=device).to(torch.bfloat16)[:, :128]
    w = torch.randn(48, 128, device=device).to(torch.bfloat16)
    out = torch.zeros(3, 64, device=device, dtype=torch.bfloat16)
    gemv(x, w, out=out[:, :48])
    assert_close(out[:, :48], x.double() @ w.double().T)
    assert not out[:, 48:].any()


def _check_fp8_gemv(device, assert_close, rows: int, shape: tuple[int, int], bias: bool, config=None,
                    dtype: torch.dtype = torch.bfloat16, weight_dtype: torch.dtype = torch.float8_e4m3fn) -> None:
    """float8_e4m3fn (or int8) weight [N, K] with random per-row float32 scales, bf16 rows (W8A16), against the
    product with the dequantized weight in float64: the 8-bit values and scales are exact there, so only the kernel's
    sums differ."""
    n, k = shape
    g = torch.Generator().manual_seed(rows * 11 + n)
    x = torch.randn(rows, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) * 100).clamp(-127, 127) if weight_dtype == torch.int8 else \
        (torch.randn(n, k, generator=g) * 100).clamp(-448, 448)
    w = w.to(weight_dtype).to(device)
    scale = ((torch.rand(n, 1, generator=g) + 0.5) / (100 * k**0.5)).to(device)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    ref = x.double() @ (w.double() * scale.double()).T + (0 if b is None else b.double())
    assert_close(gemv(x, w, b, config=config, weight_scale=scale), ref)


FP8_SHAPES = SHAPES + [(40, 199)]  # and an odd input width: fp8 rows of 199 bytes


@pytest.mark.parametrize("rows", sorted({1, 2, 4, GEMV_MAX_ROWS}))
@pytest.mark.parametrize("shape", FP8_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gemv_fp8(device, assert_close, rows, shape, bias):
    _check_fp8_gemv(device, assert_close, rows, shape, bias)


@pytest.mark.parametrize("rows", [1, 5, GEMV_MAX_ROWS])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gemv_int8_weight(device, assert_close, rows, bias):
    """W8A8 layers' decode products: int8 weights with per-row scales, the fp8 variant's code."""
    _check_fp8_gemv(device, assert_close, rows, FP8_SHAPES[-1], bias, weight_dtype=torch.int8)


@pytest.mark.parametrize("rows", [1, 4])
def test_gemv_fp8_float16(device, assert_close, rows):
    _check_fp8_gemv(device, assert_close, rows, FP8_SHAPES[-1], True, dtype=torch.float16)


@pytest.mark.parametrize("rows", [1, 3, GEMV_MAX_ROWS])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gemv_fp8_split_inputs(device, assert_close, rows, bias):
    """Each split's partial sum is scaled before the second kernel adds them (and the bias), over an odd K."""
    _check_fp8_gemv(device, assert_close, rows, FP8_SHAPES[-1], bias, config=(16, 32, 4, 3, 3))
    x = torch.randn(rows, FP8_SHAPES[-1][1], device=device).to(torch.bfloat16)
    w = torch.randn(*FP8_SHAPES[-1], device=device).to(torch.float8_e4m3fn)
    scale = torch.rand(FP8_SHAPES[-1][0], device=device) + 0.5
    first = gemv(x, w, config=(16, 32, 4, 3, 3), weight_scale=scale)
    assert torch.equal(first, gemv(x, w, config=(16, 32, 4, 3, 3), weight_scale=scale))  # deterministic
