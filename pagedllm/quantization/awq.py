"""AWQ checkpoints (`quant_method: awq`, the "gemm" version AutoAWQ writes): 4-bit codes packed along the outputs,
eight to an int32 in the interleaved order 0 2 4 6 1 3 5 7 (slot i holds output 8c + ORDER[i]), in `qweight`
[K, N / 8] and zero points in `qzeros` [G, N / 8], with `scales` [G, N]; always asymmetric and grouped."""

from __future__ import annotations

from typing import Any

import torch

from pagedllm.quantization import int_utils as iu
from pagedllm.quantization.int_weight import IntWeightMethod

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


class AwqLinearMethod(IntWeightMethod):
    name = "awq"
    leaves = {"qweight": "codes", "qzeros": "zeros", "scales": "scales"}

    def rows_view(self, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        if kind in ("codes", "zeros"):
            return iu.unpack(tensor, self.bits, dim=1, order=ORDER).t()
        return tensor.t()


def from_config(quant_config: dict[str, Any] | None, serialized: bool) -> AwqLinearMethod:
    qc = quant_config or {}  # None: random dummy weights in the common layout, groups of 128
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm" or not qc.get("zero_point", True) or group <= 0:
        raise ValueError(f"awq: unsupported configuration bits={bits}, version={version!r}, "
                         f"zero_point={qc.get('zero_point', True)}, group_size={group}; supported: 4-bit GEMM with "
                         "zero points in groups.")
    return AwqLinearMethod(4, group, symmetric=False, serialized=serialized,
                           ignore=list(qc.get("modules_to_not_convert") or []))
