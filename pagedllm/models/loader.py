"""Builds a model and fills its weights: from safetensors files, or random ("dummy") for benchmarks."""

from __future__ import annotations

import glob
import os
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn

from pagedllm.layers.linear import pack_linear_weights
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.models.registry import get_model_class


def load_model(hf_config: Any, model_path: str, dtype: torch.dtype, device: torch.device, load_format: str = "auto") -> nn.Module:
    model_cls = get_model_class(hf_config)
    with torch.device("meta"):
        model = model_cls(hf_config)
    # Materialise on the target device without initialising: every weight is loaded or randomised below.
    model = model.to_empty(device=device).to(dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    _init_buffers(model, device)
    if load_format == "dummy":
        _randomize(model, seed=0)
    elif load_format in ("auto", "safetensors"):
        _load_safetensors(model, model_path)
    else:
        raise ValueError(f"load_format must be 'auto', 'safetensors' or 'dummy', got {load_format!r}.")
    pack_linear_weights(model)
    return model.eval()


def _init_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (the rotary tables) hold garbage after `to_empty`: recompute them."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            with torch.device("cpu"):
                module.cos_sin_cache = module.build_cache().to(device)


def _safetensors_weights(model_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"No *.safetensors files in {model_path}.")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _load_safetensors(model: nn.Module, model_path: str) -> None:
    params = dict(model.named_parameters())
    stacked = getattr(model, "stacked_params", [])
    loaded: dict[str, set[int]] = {}
    for name, weight in _safetensors_weights(model_path):
        if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and getattr(model, "tie_word_embeddings", False)):
            continue
        for fused, shard, index in stacked:
            if f".{shard}." in name:
                name = name.replace(f".{shard}.", f".{fused}.")
                _copy_shard(params[name], weight, index, _shard_sizes(model, name))
                break
        else:
            if name not in params:
                raise ValueError(f"Checkpoint weight {name!r} has no place in {type(model).__name__}.")
            if params[name].shape != weight.shape:
                raise ValueError(f"Shape mismatch for {name}: checkpoint {tuple(weight.shape)}, model {tuple(params[name].shape)}.")
            params[name].data.copy_(weight)
            index = 0
        loaded.setdefault(name, set()).add(index)
    missing = [n for n in params if len(loaded.get(n, ())) < len(_shard_sizes(model, n))]
    if missing:
        raise ValueError(f"Weights missing from the checkpoint in {model_path}: {missing[:8]}")


def _copy_shard(param: torch.Tensor, weight: torch.Tensor, index: int, sizes: list[int]) -> None:
    """Copies q/k/v (or gate/up) weight `index` into its rows of the fused parameter."""
    start = sum(sizes[:index])
    if weight.shape[0] != sizes[index] or weight.shape[1:] != param.shape[1:]:
        raise ValueError(f"Shape mismatch for shard {index}: {tuple(weight.shape)} vs {sizes[index]} rows of {tuple(param.shape)}.")
    param.data[start : start + sizes[index]].copy_(weight)


def _shard_sizes(model: nn.Module, name: str) -> list[int]:
    """Row counts of the checkpoint tensors fused into parameter `name` ([all rows] if not fused)."""
    module_name, _, _ = name.rpartition(".")
    owner_name, _, leaf = module_name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf == "qkv_proj":
        return [owner.q_size, owner.kv_size, owner.kv_size]
    if leaf == "gate_up_proj":
        return [owner.down_proj.in_features] * 2
    return [model.get_parameter(name).shape[0] if model.get_parameter(name).dim() else 1]


def _randomize(model: nn.Module, seed: int) -> None:
    """Random weights of the real shapes: speed does not depend on their values."""
    for name, param in model.named_parameters():
        generator = torch.Generator(device=param.device).manual_seed(seed)
        seed += 1
        if "norm" in name:
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)
