"""GPTQ checkpoints (`quant_method: gptq`, as AutoGPTQ / GPTQModel / optimum write them): 4- or 8-bit codes packed
along the input features into int32 `qweight` [K * bits / 32, N], zero points packed along the outputs in `qzeros`
[G, N * bits / 32], `scales` [G, N], and `g_idx` [K] (each input column's group: in order, or permuted by act-order,
`desc_act`). The original ("gptq", v1) format stores each zero point minus one; GPTQModel's "gptq_v2" does not."""

from __future__ import annotations

from typing import Any

import torch

from pagedllm.quantization import int_utils as iu
from pagedllm.quantization.int_weight import IntWeightMethod


class GptqLinearMethod(IntWeightMethod):
    name = "gptq"
    leaves = {"qweight": "codes", "qzeros": "zeros", "scales": "scales", "g_idx": "g_idx"}
    optional_params = ("g_idx",)

    def __init__(self, bits: int, group_size: int | None, symmetric: bool, serialized: bool, v1_zeros: bool = True,
                 ignore: list[str] | None = None) -> None:
        super().__init__(bits, group_size, symmetric, serialized, ignore)
        self.v1_zeros = v1_zeros

    def rows_view(self, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        if kind == "codes":
            return iu.unpack(tensor, self.bits, dim=0).t()
        if kind == "zeros":
            zeros = iu.unpack(tensor, self.bits, dim=1)
            if self.v1_zeros:  # stored minus one (a zero point of 0 wrapped to all ones)
                zeros = ((zeros.int() + 1) & ((1 << self.bits) - 1)).to(torch.uint8)
            return zeros.t()
        return tensor.t() if kind == "scales" else tensor


def from_config(quant_config: dict[str, Any] | None, serialized: bool) -> GptqLinearMethod:
    qc = quant_config or {}  # None: random dummy weights in the common layout, 4 bits in groups of 128
    bits, group = int(qc.get("bits", 4)), int(qc.get("group_size", 128))
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"gptq: unsupported checkpoint_format {fmt!r} (gptq, gptq_v2).")
    if qc.get("dynamic"):
        raise ValueError("gptq: per-module overrides (GPTQModel's `dynamic`) are not supported.")
    ignore = list(qc.get("modules_to_not_convert") or [])
    return GptqLinearMethod(bits, None if group == -1 else group, bool(qc.get("sym", True)), serialized,
                            v1_zeros=fmt == "gptq", ignore=ignore)
