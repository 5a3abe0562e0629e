"""FP8 (float8_e4m3fn) quantize/dequantize helpers shared by the FP8 methods; the CPU path and the reference
for the GPU one. A scale s maps real values to fp8 ones: q = fp8(clamp(x / s, +-448)), x ~= q * s."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# An all-zero row or block would get scale 0 and then 0 / 0: any positive scale quantizes it to zeros.
MIN_SCALE = 1e-12


def scale_for(amax: torch.Tensor) -> torch.Tensor:
    return (amax.float() / FP8_MAX).clamp(min=MIN_SCALE)


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float8 values of x / scale (broadcast), saturated at +-448: casting a larger value gives NaN (e4m3fn has no inf)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row scales [M, 1] = amax(row) / 448 and the rows in fp8."""
    scale = scale_for(x.abs().amax(dim=-1, keepdim=True))
    return quantize(x, scale), scale


def _blocked(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """x [R, C] zero-padded to whole blocks, as [R/rows, rows, C/cols, cols]: partial edge blocks (ceil-div grids)."""
    pad_r, pad_c = -x.shape[0] % rows, -x.shape[1] % cols
    x = F.pad(x, (0, pad_c, 0, pad_r))
    return x.view(x.shape[0] // rows, rows, x.shape[1] // cols, cols)


def expand_blocks(grid: torch.Tensor, rows: int, cols: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A per-block grid [ceil(R/rows), ceil(C/cols)] repeated over its blocks and cut to `shape` [R, C]."""
    return grid.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)[: shape[0], : shape[1]]


def quantize_blocks(x: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block scales [ceil(R/rows), ceil(C/cols)] and x in fp8: weights block-wise (128x128), activations
    per token and group (rows=1, cols=128)."""
    x2 = x.reshape(-1, x.shape[-1])
    grid = scale_for(_blocked(x2, rows, cols).abs().amax(dim=(1, 3)))
    return quantize(x2, expand_blocks(grid, rows, cols, tuple(x2.shape))).view(x.shape), grid


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [N, K] in fp8 with per-output-channel scales [N, 1] = amax(row) / 448."""
    return quantize_per_token(w)


def fake_quantize(x: torch.Tensor, scheme: str, input_scale: torch.Tensor | None = None, group: int = 128) -> torch.Tensor:
    """x quantized to fp8 and back in x.dtype: the activation rounding the GPU's fp8 GEMM sees, emulated.
    scheme: token (dynamic per row), group (dynamic per row and `group` columns), static (per-tensor input_scale)."""
    if scheme == "token":
        q, scale = quantize_per_token(x)
    elif scheme == "group":
        q, grid = quantize_blocks(x, 1, group)
        scale = expand_blocks(grid, 1, group, (grid.shape[0], x.shape[-1])).view(x.shape)
    elif scheme == "static":
        assert input_scale is not None
        q, scale = quantize(x, input_scale), input_scale
    else:
        raise ValueError(f"Unknown activation scheme {scheme!r}.")
    return (q.float() * scale).to(x.dtype)
