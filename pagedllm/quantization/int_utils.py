"""Integer weights (4 or 8 bits) in the one layout every integer method converts its checkpoint into at load, and
the torch reference of their product (the CPU path, and what the kernels are tested against).

The layout ("rows packed along K"): for a weight [N, K],
- `packed` int32 [N, K * bits / 32]: unsigned codes q in [0, 2**bits), code k of row n in word k // (32 / bits) at
  bits (k % (32 / bits)) * bits (the first code in the lowest bits), as compressed-tensors' pack-quantized stores it;
- `scales` [N, G] and `zeros` uint8 [N, G], G = ceil(K / group_size) (one group over the whole row: per channel);
- w[n, k] = (q[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]. Symmetric formats have zeros
  2**(bits - 1) everywhere (signed codes stored with an offset), which keeps one formula for all of them.
Row n's codes are contiguous, as the GEMV streams them and as tensor-parallel splits of the output rows cut them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_BITS = (4, 8)


def pack_factor(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{bits}-bit integer weights are not supported (4 or 8 bits).")
    return 32 // bits


def pack(codes: torch.Tensor, bits: int, dim: int = 1, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Unsigned codes (any integer dtype, values in [0, 2**bits)) into int32 words along `dim`, the first code of each
    word in its lowest bits; `order[i]` names the code that goes to slot i (AWQ's interleave), identity by default."""
    per = pack_factor(bits)
    c = codes.movedim(dim, -1).to(torch.int64)
    if c.shape[-1] % per:
        raise ValueError(f"Packing {bits}-bit codes needs a multiple of {per} along the packed dimension, got {c.shape[-1]}.")
    c = c.reshape(*c.shape[:-1], -1, per)
    if order is not None:
        c = c[..., list(order)]
    words = (c << (torch.arange(per, device=c.device) * bits)).sum(-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # the unsigned word's bits as an int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack(words: torch.Tensor, bits: int, dim: int = 1, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """pack's inverse: uint8 codes, 32 / bits of them per int32 word along `dim`."""
    per = pack_factor(bits)
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    codes = (w[..., None] >> (torch.arange(per, device=w.device) * bits)) & ((1 << bits) - 1)
    if order is not None:  # slot i holds code order[i]: put each code back in its place
        codes = codes[..., [order.index(j) for j in range(per)]]
    return codes.reshape(*w.shape[:-1], -1).to(torch.uint8).movedim(-1, dim)


@dataclass
class IntWeight:
    """A layer's weight in the layout above, plus `perm`: where a checkpoint reordered its input columns (GPTQ's
    act-order), the activations' columns gathered by it line up with the sorted codes."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    perm: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.packed, self.scales, self.zeros, self.bits, self.group_size, self.in_features).to(dtype)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
               in_features: int) -> torch.Tensor:
    """The float32 weight [N, K]."""
    q = unpack(packed, bits)[:, :in_features].float()
    s = scales.float().repeat_interleave(group_size, dim=1)[:, :in_features]
    z = zeros.float().repeat_interleave(group_size, dim=1)[:, :in_features]
    return (q - z) * s


def group_count(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes [N, K] (uint8), scales [N, G] (float32) and zeros [N, G] (uint8) of a float weight:
    symmetric scale amax / (2**(bits-1) - 1) around the code 2**(bits-1), or asymmetric over [min, max] (a group
    that does not reach 0 still keeps 0 representable). For random dummy weights and the test checkpoints."""
    n, k = weight.shape
    g = group_count(k, group_size)
    w = F.pad(weight.float(), (0, g * group_size - k)).view(n, g, group_size)
    top = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        scales = (w.abs().amax(-1) / (mid - 1)).clamp(min=1e-10)
        zeros = torch.full((n, g), mid, dtype=torch.float32, device=w.device)
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scales = ((hi - lo) / top).clamp(min=1e-10)
        zeros = (-lo / scales).round().clamp(0, top)
    codes = (w / scales[..., None] + zeros[..., None]).round().clamp(0, top)
    return codes.view(n, -1)[:, :k].to(torch.uint8), scales, zeros.to(torch.uint8)


def int_linear(x: torch.Tensor, weight: IntWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The reference product (CPU, and any case no kernel covers): dequantize, then a float product."""
    if weight.perm is not None:
        x = x.index_select(-1, weight.perm)
    return F.linear(x, weight.dequantize(x.dtype), bias)
