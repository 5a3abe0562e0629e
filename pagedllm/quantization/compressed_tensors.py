"""The `compressed-tensors` method (checkpoints written by llm-compressor), by format:
- `float-quantized`: 8-bit float weights (per-tensor, per-channel or block) and optional 8-bit float activations
  (dynamic per token, dynamic per group, or static per tensor), run by the FP8 method;
- `pack-quantized`: 4- or 8-bit integer weights (W4A16, W8A16; symmetric or with zero points; in groups or per
  channel; act-order's `weight_g_idx`), packed along the input features into `weight_packed` [N, K * bits / 32] with
  signed codes offset by 2**(bits - 1), zero points packed the same way along the outputs;
- `int-quantized`: W8A8 int8 (per-channel or per-tensor weights, int8 activations per token or static).
Other formats and schemes are refused by name."""

from __future__ import annotations

from typing import Any

import torch

from pagedllm.quantization import int_utils as iu
from pagedllm.quantization.base import QuantMethod
from pagedllm.quantization.fp8 import Fp8LinearMethod
from pagedllm.quantization.int8 import Int8LinearMethod
from pagedllm.quantization.int_weight import IntWeightMethod

_FP8_ARGS = {"num_bits": 8, "type": "float"}


def _is_fp8(args: dict[str, Any]) -> bool:
    return all(args.get(k) == v for k, v in _FP8_ARGS.items()) and args.get("symmetric", True)


def _describe(args: dict[str, Any] | None) -> str:
    if args is None:
        return "none"
    return f"{args.get('num_bits')}-bit {args.get('type')} {args.get('strategy')} (dynamic={args.get('dynamic')})"


class PackedIntLinearMethod(IntWeightMethod):
    name = "compressed-tensors"
    optional_params = ("weight_g_idx",)

    def __init__(self, bits: int, group_size: int | None, symmetric: bool, serialized: bool,
                 ignore: list[str] | None = None) -> None:
        self.leaves = {"weight_packed": "codes", "weight_scale": "scales", "weight_shape": "shape",
                       "weight_g_idx": "g_idx", **({} if symmetric else {"weight_zero_point": "zeros"})}
        super().__init__(bits, group_size, symmetric, serialized, ignore)

    def rows_view(self, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        if kind == "codes":
            return iu.unpack(tensor, self.bits, dim=1)
        if kind == "zeros":  # packed along the outputs; the rows past N are padding
            return iu.unpack(tensor, self.bits, dim=0)
        return tensor


def from_config(quant_config: dict[str, Any], serialized: bool) -> QuantMethod:
    fmt = quant_config.get("format")
    groups = quant_config.get("config_groups") or {}
    if not groups:
        raise ValueError("compressed-tensors: the quantization_config has no config_groups.")
    formats = {group.get("format") or fmt for group in groups.values()}
    if len(formats) != 1:
        raise ValueError(f"compressed-tensors: config groups in different formats {sorted(map(str, formats))} "
                         "are not supported.")
    (fmt,) = formats
    if any(group.get("output_activations") is not None for group in groups.values()):
        raise ValueError("compressed-tensors: output activation quantization is not supported.")
    ignore = quant_config.get("ignore")
    if fmt == "pack-quantized":
        bits, group_size, symmetric = _one_scheme([_int_weights(g.get("weights"), g.get("input_activations"))
                                                   for g in groups.values()])
        return PackedIntLinearMethod(bits, group_size, symmetric, serialized, ignore=ignore)
    if fmt == "int-quantized":
        weights, acts = _one_scheme([_int8_scheme(g.get("weights"), g.get("input_activations"))
                                     for g in groups.values()])
        return Int8LinearMethod(weights, acts if serialized else "token", serialized, ignore=ignore)
    schemes = []
    for group in groups.values():
        weights, acts = group.get("weights"), group.get("input_activations")
        if fmt != "float-quantized" or not weights or not _is_fp8(weights) or weights.get("dynamic"):
            raise ValueError(f"compressed-tensors: unsupported format {fmt!r} with weights {_describe(weights)}; "
                             "supported: float-quantized (8-bit float weights: tensor, channel or block strategy), "
                             "pack-quantized (4- or 8-bit int weights: group or channel), int-quantized (W8A8 int8).")
        schemes.append((_weights(weights), _activations(acts), tuple(weights.get("block_structure") or (128, 128))))
    weights, acts, block = _one_scheme(schemes)
    if not serialized:  # random dummy weights quantized at load
        return Fp8LinearMethod("block" if weights == "block" else "channel", "group" if weights == "block" else "token",
                               serialized=False, block=block, ignore=quant_config.get("ignore"))
    return Fp8LinearMethod(weights, acts, serialized=True, block=block, ignore=quant_config.get("ignore"))


def _one_scheme(schemes: list[Any]) -> Any:
    if len(set(schemes)) != 1:
        raise ValueError(f"compressed-tensors: config groups with different schemes {sorted(set(map(str, schemes)))} "
                         "are not supported.")
    return schemes[0]


def _int_weights(weights: dict[str, Any] | None, acts: dict[str, Any] | None) -> tuple[int, int | None, bool]:
    """(bits, group size or None per channel, symmetric) of a pack-quantized weight-only scheme."""
    ok = (weights and weights.get("type") == "int" and weights.get("num_bits") in iu.SUPPORTED_BITS
          and weights.get("strategy") in ("group", "channel") and not weights.get("dynamic"))
    if not ok or acts is not None:
        raise ValueError(f"compressed-tensors: unsupported pack-quantized scheme: weights {_describe(weights)}, "
                         f"activations {_describe(acts)}; supported: 4- or 8-bit int weights by group or channel, "
                         "16-bit activations.")
    group = weights.get("group_size") if weights["strategy"] == "group" else None
    return int(weights["num_bits"]), group, bool(weights.get("symmetric", True))


def _int8_scheme(weights: dict[str, Any] | None, acts: dict[str, Any] | None) -> tuple[str, str]:
    """(weight strategy, activation scheme) of a W8A8 int8 scheme."""
    def int8(args: dict[str, Any] | None) -> bool:
        return bool(args) and args.get("type") == "int" and args.get("num_bits") == 8 and args.get("symmetric", True)

    if not int8(weights) or weights.get("strategy") not in ("channel", "tensor") or not int8(acts):
        raise ValueError(f"compressed-tensors: unsupported int-quantized scheme: weights {_describe(weights)}, "
                         f"activations {_describe(acts)}; supported: symmetric 8-bit int weights (channel or tensor) "
                         "and activations (dynamic per token, or static per tensor).")
    if acts.get("dynamic") and acts.get("strategy") in ("token", "tensor"):
        return weights["strategy"], "token"
    if not acts.get("dynamic") and acts.get("strategy") == "tensor":
        return weights["strategy"], "static"
    raise ValueError(f"compressed-tensors: unsupported int8 activations {_describe(acts)}.")


def _weights(args: dict[str, Any]) -> str:
    strategy = args.get("strategy")
    if strategy not in ("tensor", "channel", "block"):
        raise ValueError(f"compressed-tensors: unsupported fp8 weight strategy {strategy!r} (tensor, channel, block).")
    return str(strategy)


def _activations(args: dict[str, Any] | None) -> str | None:
    if args is None:
        return None  # weight-only (W8A16): activations stay 16-bit
    if not _is_fp8(args):
        raise ValueError(f"compressed-tensors: unsupported input activations {_describe(args)}; supported: 8-bit float.")
    strategy, dynamic = args.get("strategy"), bool(args.get("dynamic"))
    if dynamic and strategy in ("token", "tensor"):
        return "token"  # a dynamic per-tensor scale is taken per token here: finer, and what the GEMM scales by
    if dynamic and strategy == "group" and args.get("group_size") == 128:
        return "group"
    if not dynamic and strategy == "tensor":
        return "static"
    raise ValueError(f"compressed-tensors: unsupported input activations {_describe(args)} "
                     "(dynamic token/tensor, dynamic group of 128, or static tensor).")
