"""Per-token activation quantization to float8 and int8 (standalone, and fused into RMSNorm and SiLU-and-mul) against
the torch references (quantization/fp8_utils.py, int8.py), bit for bit; the Triton scaled GEMM (fp8 block-wise and
row-wise, int8 row-wise) against the float64 product of its dequantized operands, and against torch._scaled_mm
where the GPU has it."""

import pytest
import torch

pytest.importorskip("triton")

from pagedllm.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from pagedllm.kernels.norm import fused_add_rms_norm, rms_norm  # noqa: E402
from pagedllm.kernels.quant_rows import quantize_rows  # noqa: E402
from pagedllm.kernels.scaled_gemm import scaled_gemm, scaled_gemm_ref  # noqa: E402
from pagedllm.quantization import fp8_utils as fq  # noqa: E402
from pagedllm.quantization.int8 import quantize_per_token_int8  # noqa: E402

FP8, INT8 = torch.float8_e4m3fn, torch.int8
# On the host: CUDA's torch divides by a Python scalar as a multiply by its reciprocal (1 ulp off IEEE division),
# while the kernels and the CPU references divide exactly.
REFERENCE = {FP8: lambda x: fq.quantize_per_token(x.cpu()), INT8: lambda x: quantize_per_token_int8(x.cpu())}


def _rows(m: int, k: int, device, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + m * 31 + k)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10
    x[0, : k // 2] = 0  # a half-zero row; a zero row below: the minimum scale
    if m > 2:
        x[2] = 0
    return x.to(device, dtype)


def _assert_same(q: torch.Tensor, scale: torch.Tensor, ref_q: torch.Tensor, ref_scale: torch.Tensor) -> None:
    assert q.dtype == ref_q.dtype and q.shape == ref_q.shape and scale.shape == ref_scale.shape
    q, scale = q.cpu(), scale.cpu()
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
    # values, not bits: the interpreter's exact rounding (kernels.to_fp8) writes -0 as +0
    assert torch.equal(q.float(), ref_q.float()), "fp8 values differ from the reference"


@pytest.mark.parametrize("quant", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("k", [64, 200, 4096, 5000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_rows_per_token(device, k, dtype, quant):
    x = _rows(5, k, device, dtype)
    if quant == INT8:
        x[1, :4] = torch.tensor([0.5, 1.5, 2.5, -2.5]) * x[1].abs().max() / 127  # halves: round to even
    q, scale = quantize_rows(x, quant)
    _assert_same(q, scale, *REFERENCE[quant](x))


@pytest.mark.parametrize("k", [128, 384, 200])
def test_quantize_rows_per_group(device, k):
    x = _rows(4, k, device)
    q, scale = quantize_rows(x, group=128)
    _assert_same(q, scale, *fq.quantize_blocks(x.cpu(), 1, 128))


@pytest.mark.parametrize("quant", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("k", [64, 300])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_quantized(device, k, residual, quant):
    """The fused norm's 8-bit rows equal quantizing the unfused norm's 16-bit output; the residual is unchanged."""
    x, w = _rows(6, k, device), _rows(1, k, device, seed=1)[0] + 1
    res = _rows(6, k, device, seed=2) if residual else None
    rows = fused_add_rms_norm(x, res, w, 1e-6, quant) if residual else (rms_norm(x, w, 1e-6, quant), None)
    plain, plain_sum = fused_add_rms_norm(x, res, w, 1e-6) if residual else (rms_norm(x, w, 1e-6), None)
    _assert_same(rows[0].q, rows[0].scale, *REFERENCE[quant](plain))
    if residual:
        assert torch.equal(rows[1], plain_sum)


@pytest.mark.parametrize("quant", [FP8, INT8], ids=["fp8", "int8"])
@pytest.mark.parametrize("inter", [96, 3000])
@pytest.mark.parametrize("gelu", [False, True], ids=["silu", "gelu_tanh"])
def test_silu_and_mul_quantized(device, assert_close, inter, quant, gelu):
    x = _rows(5, 2 * inter, device)
    rows = silu_and_mul(x, quant, gelu)
    plain = silu_and_mul(x, gelu=gelu)
    _assert_same(rows.q, rows.scale, *REFERENCE[quant](plain))
    assert_close(plain, silu_and_mul_ref(x, gelu), interp_bound=2e-2)


def _operands(m: int, n: int, k: int, device, scaling: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed + m + n * 3 + k * 7)
    a, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k**0.5
    if scaling == "int8":
        (aq, sa), (wq, sw) = quantize_per_token_int8(a), quantize_per_token_int8(w)
    elif scaling == "block":
        aq, sa = fq.quantize_blocks(a, 1, 128)
        wq, grid = fq.quantize_blocks(w, 128, 128)
        sw = grid.repeat_interleave(128, dim=0)[:n]  # as quantization/fp8.py stores block scales: widened over rows
    else:
        (aq, sa), (wq, sw) = fq.quantize_per_token(a), fq.quantize_per_channel(w)
    return aq.to(device), sa.to(device), wq.to(device), sw.to(device)


@pytest.mark.parametrize("scaling", ["block", "row", "int8"])
@pytest.mark.parametrize("mnk", [(1, 64, 256), (17, 200, 384), (130, 96, 200), (64, 256, 512)], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_scaled_gemm(device, assert_close, scaling, mnk, bias):
    m, n, k = mnk
    a, sa, w, sw = _operands(m, n, k, device, scaling)
    b = torch.randn(n).to(device, torch.bfloat16) if bias else None
    ref = scaled_gemm_ref(a, sa, w, sw, b)
    out = scaled_gemm(a, sa, w, sw, b)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref)
    if scaling == "row" and device.type == "cuda" and torch.cuda.get_device_capability() >= (8, 9) and m >= 16:
        mm = torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sw.reshape(1, n), bias=b, out_dtype=torch.bfloat16)
        assert_close(mm, ref)


def test_scaled_gemm_rejects_mismatched_scales(device):
    a, sa, w, sw = _operands(4, 64, 256, device, "block")
    with pytest.raises(AssertionError):
        scaled_gemm(a, sa[:, :1].repeat(1, 3), w, sw)
