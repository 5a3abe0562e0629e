"""The `compressed-tensors` method (checkpoints written by llm-compressor): the `float-quantized` format with 8-bit
float weights (per-tensor, per-channel or block) and optional 8-bit float activations (dynamic per token, dynamic
per group, or static per tensor), run by the FP8 method. Other formats and schemes are refused by name."""

from __future__ import annotations

from typing import Any

from pagedllm.quantization.fp8 import Fp8LinearMethod

_FP8_ARGS = {"num_bits": 8, "type": "float"}


def _is_fp8(args: dict[str, Any]) -> bool:
    return all(args.get(k) == v for k, v in _FP8_ARGS.items()) and args.get("symmetric", True)


def _describe(args: dict[str, Any] | None) -> str:
    if args is None:
        return "none"
    return f"{args.get('num_bits')}-bit {args.get('type')} {args.get('strategy')} (dynamic={args.get('dynamic')})"


def from_config(quant_config: dict[str, Any], serialized: bool) -> Fp8LinearMethod:
    fmt = quant_config.get("format")
    groups = quant_config.get("config_groups") or {}
    if not groups:
        raise ValueError("compressed-tensors: the quantization_config has no config_groups.")
    schemes = []
    for group in groups.values():
        weights, acts = group.get("weights"), group.get("input_activations")
        group_fmt = group.get("format") or fmt
        if group_fmt != "float-quantized" or not weights or not _is_fp8(weights) or weights.get("dynamic"):
            raise ValueError(f"compressed-tensors: unsupported format {group_fmt!r} with weights {_describe(weights)}; "
                             "supported: float-quantized, 8-bit float weights (tensor, channel or block strategy).")
        if group.get("output_activations") is not None:
            raise ValueError("compressed-tensors: output activation quantization is not supported.")
        schemes.append((_weights(weights), _activations(acts), tuple(weights.get("block_structure") or (128, 128))))
    if len(set(schemes)) != 1:
        raise ValueError(f"compressed-tensors: config groups with different schemes {sorted(set(map(str, schemes)))} "
                         "are not supported.")
    (weights, acts, block), = set(schemes)
    if not serialized:  # random dummy weights quantized at load
        return Fp8LinearMethod("block" if weights == "block" else "channel", "group" if weights == "block" else "token",
                               serialized=False, block=block, ignore=quant_config.get("ignore"))
    return Fp8LinearMethod(weights, acts, serialized=True, block=block, ignore=quant_config.get("ignore"))


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
