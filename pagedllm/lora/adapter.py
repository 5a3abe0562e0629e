"""A PEFT LoRA adapter read from disk: per target module (the base checkpoint's name, e.g.
`model.layers.0.self_attn.q_proj`), A [r, in] and B [out, r] with the scaling folded into B: lora_alpha / r, or
lora_alpha / sqrt(r) with rsLoRA."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from pagedllm.lora.request import LoRARequest

_PREFIX = "base_model.model."


@dataclass
class LoRAAdapter:
    request: LoRARequest
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], scaled B [out, r]), float32


def load_adapter(request: LoRARequest, max_rank: int, modules: set[str],
                 renamed: Sequence[tuple[str, str]] = ()) -> LoRAAdapter:
    """Reads and checks an adapter: ValueError (naming the problem) for a missing path or file, a config this engine
    does not run, a rank above max_rank, or target modules the model lacks (`modules`: its LoRA-able linears).
    `renamed`: the model's (checkpoint prefix, its own) pairs, applied to the adapter's module names too (PEFT
    names a vision-language model's decoder `model.language_model.…`)."""
    path = request.lora_path
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"LoRA adapter {request.lora_name!r}: no adapter_config.json in {path!r}.")
    with open(config_file) as f:
        config = json.load(f)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {request.lora_name!r}: peft_type {config.get('peft_type')!r} is not LORA.")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    if rank > max_rank:
        raise ValueError(f"LoRA adapter {request.lora_name!r}: rank {rank} exceeds max_lora_rank={max_rank}.")
    supported = {"bias": config.get("bias", "none") == "none", "modules_to_save": not config.get("modules_to_save"),
                 "use_dora": not config.get("use_dora"), "fan_in_fan_out": not config.get("fan_in_fan_out")}
    for key, ok in supported.items():
        if not ok:
            raise ValueError(f"LoRA adapter {request.lora_name!r}: {key}={config.get(key)!r} is not supported.")
    weights_file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights_file):
        raise ValueError(f"LoRA adapter {request.lora_name!r}: no adapter_model.safetensors in {path!r}.")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = load_file(weights_file)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    other: list[str] = []  # embedding LoRA, saved modules: tensors this engine has no place for
    for name, tensor in tensors.items():
        stripped = name.removeprefix(_PREFIX)
        for checkpoint_name, own_name in renamed:
            stripped = stripped.replace(checkpoint_name, own_name)
        kind = next((k for k in ("lora_A", "lora_B") if f".{k}." in stripped), None)
        if kind is None:
            other.append(stripped)
            continue
        parts.setdefault(stripped.split(f".{kind}.")[0], {})[kind] = tensor.float()
    unknown = sorted(set(parts) - modules) + sorted(other)
    if unknown:
        raise ValueError(f"LoRA adapter {request.lora_name!r} targets modules the model has no LoRA layer for: "
                         f"{unknown[:4]}.")
    weights = {}
    for module, ab in parts.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA adapter {request.lora_name!r}: {module} lacks lora_A or lora_B.")
        weights[module] = (ab["lora_A"], ab["lora_B"] * scale)
    return LoRAAdapter(request, rank, weights)
