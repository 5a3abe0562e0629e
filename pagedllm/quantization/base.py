"""The seam between a linear layer and its quantization method, as vLLM's `LinearMethodBase`: the method creates
the layer's weights and scales, loads the checkpoint's scale tensors, converts them once after loading, and
computes the layer's product."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagedllm.layers.sharding import Weight


@dataclass(frozen=True)
class QuantRows:
    """Activations quantized per token by the kernel that made them (an RMSNorm, a SiLU-and-mul), handed to an FP8 or
    W8A8 layer instead of the 16-bit rows, whose GEMM takes them as they are (`Fp8LinearMethod.prepare_model`)."""

    q: torch.Tensor  # [M, K] float8_e4m3fn or int8
    scale: torch.Tensor  # [M, 1] float32


def rows_quantization(quant_rows: torch.dtype | None, x: torch.Tensor) -> torch.dtype | None:
    """What a producer (RMSNorm, SiLU-and-mul) with `quant_rows` set hands on for these rows: QuantRows of that dtype,
    except where the layer after multiplies few rows in its GEMV (W8A16: 16-bit rows, no activation rounding)."""
    if quant_rows is None:
        return None
    from pagedllm.layers.linear import GEMV_MAX_ROWS, gemv_enabled

    rows = x.numel() // x.shape[-1]
    return None if rows <= GEMV_MAX_ROWS and gemv_enabled(x.device, x.dtype) else quant_rows


def row_shards(layer: nn.Module) -> list[tuple[int, int, int]]:
    """(checkpoint rows, start, size) of each checkpoint tensor fused into the layer's output rows (this rank's)."""
    shards = getattr(layer, "shards", None)
    return [(s.rows, s.start, s.size) for s in shards] if shards else [(layer.out_features, 0, layer.out_features)]


def input_columns(layer: nn.Module) -> tuple[int, int, int]:
    """(checkpoint input features, start, size) of this rank's input columns (a row-parallel layer's split)."""
    col = getattr(layer, "shard", None)
    return (col.rows, col.start, col.size) if col else (layer.in_features, 0, layer.in_features)


def is_ignored(name: str, ignore: list[str]) -> bool:
    """compressed-tensors' `ignore` ("re:<regex>" or a module name) and HF's `modules_to_not_convert`
    (a name or a dotted part of one, such as "lm_head")."""
    for entry in ignore:
        if entry.startswith("re:"):
            if re.match(entry[3:], name):
                return True
        elif name == entry or f".{entry}." in f".{name}.":
            return True
    return False


class QuantMethod:
    name = "base"
    # The layer's parameters that the method fills from the checkpoint itself (scales, packed codes, ...); those a
    # checkpoint may lack (GPTQ's g_idx) are optional.
    param_names: tuple[str, ...] = ()
    optional_params: tuple[str, ...] = ()

    def __init__(self, ignore: list[str] | None = None) -> None:
        self.ignore = list(ignore or [])

    def quantizes(self, checkpoint_names: list[str]) -> bool:
        """Whether the layer holding these checkpoint modules (several when fused, q/k/v say) is quantized:
        all or none of them, as one fused weight has one format."""
        ignored = [is_ignored(n, self.ignore) for n in checkpoint_names]
        if any(ignored) and not all(ignored):
            raise ValueError(f"{self.name}: the fused modules {checkpoint_names} must be all quantized or all ignored.")
        return not any(ignored)

    def create_weights(self, layer: nn.Module) -> None:
        raise NotImplementedError

    def load_param(self, layer: nn.Module, name: str, param: torch.Tensor, weight: Weight, index: int) -> None:
        raise NotImplementedError

    def checkpoint_weights(self) -> dict[str, Any]:
        """Checkpoint tensors the method reads from elsewhere than the model directory (a .gguf file's blocks), by
        checkpoint name; the loader takes them in place of the directory's."""
        return {}

    def random_weight(self, layer: nn.Module, checkpoint_name: str, rows: int, generator: torch.Generator) -> Weight:
        """For a dummy load: a random checkpoint tensor for one of `param_names`, in the method's stored format.
        Methods that quantize random 16-bit weights at load never have these parameters then."""
        raise NotImplementedError(f"{self.name}: no random weights in its stored format.")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        raise NotImplementedError

    def prepare_model(self, model: nn.Module) -> None:
        """Once the whole model's layers are processed: wiring that spans layers (fp8's fused activations)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"method": self.name}
