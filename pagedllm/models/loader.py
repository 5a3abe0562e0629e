"""Builds a model and fills its weights: from safetensors files, or random ("dummy") for benchmarks.

Under tensor/pipeline parallelism each rank builds only its part of the model, and each parameter's
owning layer slices the checkpoint tensors it needs (`weight_loader`), reading only those bytes.

Quantized models (pagedllm/quantization/): the method gives each quantized linear its parameters before loading;
checkpoint scales (`*.weight_scale`, `*.weight_scale_inv`, `*.input_scale`) load into the owning layer through the
method, and the KV-cache scales of FP8 checkpoints (`*.self_attn.k_scale` / `v_scale`) become floats on the
layer's `Attention`. A model converted from a .gguf file keeps, on CUDA, its decoder linears' quantized blocks: those
weights are read from the .gguf file (pagedllm/quantization/gguf.py), the rest from the converted directory.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import zlib
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn

from pagedllm.layers.embedding import ParallelLMHead
from pagedllm.layers.linear import Linear, pack_linear_weights
from pagedllm.layers.moe import expert_index
from pagedllm.layers.pipeline import is_missing
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.layers.sharding import Weight, load_whole, read_whole, row_range, weight_shape
from pagedllm.models.registry import get_model_class
from pagedllm.quantization import QuantMethod, resolve_quant_method
from pagedllm.quantization.gguf import file_method

# Checkpoint spellings of the same scale: HF's fine-grained fp8 and compressed-tensors' / vLLM's.
_SCALE_ALIASES = {".weight_scale_inv": ".weight_scale", ".activation_scale": ".input_scale"}
_KV_SCALES = {".self_attn.k_scale": "k_scale", ".self_attn.v_scale": "v_scale",
              ".self_attn.k_proj.output_scale": "k_scale", ".self_attn.v_proj.output_scale": "v_scale"}
_UNUSED_SCALES = (".self_attn.q_scale", ".self_attn.prob_scale", ".self_attn.q_proj.output_scale")  # fp8 attention math
_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.weight")  # an MoE expert's projection: prefix, expert, name


def load_model(hf_config: Any, model_path: str, dtype: torch.dtype, device: torch.device, load_format: str = "auto",
               quantization: str | None = None) -> nn.Module:
    """quantization: as EngineConfig.quantization (None: as the checkpoint's quantization_config says)."""
    model_cls = get_model_class(hf_config)
    method = resolve_quant_method(hf_config, quantization, load_format)
    if method is None and load_format != "dummy":
        method = file_method(hf_config, model_path, device)  # a .gguf model's blocks, where they are kept
    with torch.device("meta"), _default_dtype(dtype):
        model = model_cls(hf_config)
        if method is not None:
            _quantize_linears(model, method)
    # Materialise on the target device, in the target dtype (a float32 copy first would not fit beside a
    # large model's shard), without initialising: every weight is loaded or randomised below.
    model = model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    _init_buffers(model, device)
    if load_format == "dummy":
        _randomize(model)
    elif load_format in ("auto", "safetensors"):
        replaced = method.checkpoint_weights() if method is not None else {}
        _load_safetensors(model, model_path, replaced)
    else:
        raise ValueError(f"load_format must be 'auto', 'safetensors' or 'dummy', got {load_format!r}.")
    pack_linear_weights(model)
    if method is not None:
        method.prepare_model(model)
    return model.eval()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _quantize_linears(model: nn.Module, method: QuantMethod) -> None:
    """Every linear of the decoder layers (q/k/v/o, gate/up/down) unless the config ignores it; the embedding and
    the LM head stay 16-bit, as vLLM's."""
    stacked = getattr(model, "stacked_params", [])
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or isinstance(module, ParallelLMHead):
            continue
        fused = [name.replace(f".{f}", f".{shard}") for f, shard, _ in stacked if name.endswith(f".{f}")]
        if method.quantizes(fused or [name]):
            module.set_quant_method(method)


def _init_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (the rotary tables) hold garbage after `to_empty`: recompute them."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.cos_sin_cache = module.build_cache().to(device)


def _safetensors_weights(model_path: str) -> Iterator[tuple[str, Weight]]:
    """Lazy slices: a layer reads only the rows or columns its rank holds."""
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"No *.safetensors files in {model_path}.")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


def checkpoint_names(model_path: str) -> set[str]:
    """The tensor names of a directory's safetensors files (their headers only)."""
    return {name for name, _ in _safetensors_weights(model_path)}


def _load_safetensors(model: nn.Module, model_path: str, replaced: dict[str, Any] | None = None) -> None:
    """replaced: checkpoint tensors read from elsewhere (a .gguf file's blocks) instead of the directory's."""
    params = dict(model.named_parameters())
    loaded: dict[str, set[int]] = {}
    own = getattr(model, "load_own_weight", None)  # parts that load themselves (a vision tower), True if taken
    for name, weight in _safetensors_weights(model_path):
        weight = (replaced or {}).get(name, weight)
        if own is not None and own(name, weight):
            continue
        if _load_kv_scale(model, name, weight):
            continue
        for alias, canonical in _SCALE_ALIASES.items():
            name = name[: -len(alias)] + canonical if name.endswith(alias) else name
        parts = _prefused_parts(model, params, name, weight)
        for target, index, part in parts or [(t, i, weight) for t, i in _targets(model, params, name)]:
            if target not in params:
                if is_missing(model, target):
                    continue  # another pipeline stage's
                raise ValueError(f"Checkpoint weight {name!r} has no place in {type(model).__name__}.")
            _load_param(model, target, params[target], part, index)
            loaded.setdefault(target, set()).add(index)
    own_prefixes = getattr(model, "own_weight_prefixes", ())
    missing = [n for n, p in params.items() if len(loaded.get(n, ())) < len(_checkpoint_shapes(model, n, p))
               and not _optional(model, n) and not n.startswith(own_prefixes)]
    if missing:
        raise ValueError(f"Weights missing from the checkpoint in {model_path}: {missing[:8]}")


def _load_kv_scale(model: nn.Module, name: str, weight: Weight) -> bool:
    """A KV-cache scale goes to its layer's Attention as a Python float (1.0 there when the checkpoint has none);
    True when `name` was one (or an attention scale we have no use for)."""
    if name.endswith(_UNUSED_SCALES):
        return True
    suffix = next((s for s in _KV_SCALES if name.endswith(s)), None)
    if suffix is None:
        return False
    attn = name[: -len(suffix)] + ".self_attn.attn"
    if is_missing(model, attn + ".x"):
        return True  # another pipeline stage's
    value = read_whole(weight).float()
    if value.numel() != 1:
        raise ValueError(f"Per-tensor KV-cache scales are supported; {name} has shape {tuple(value.shape)}.")
    setattr(model.get_submodule(attn), _KV_SCALES[suffix], float(value))
    return True


def _targets(model: nn.Module, params: dict[str, nn.Parameter], name: str) -> list[tuple[str, int]]:
    """The parameters checkpoint tensor `name` loads into, each with the tensor's index among those fused there."""
    tied = getattr(model, "tie_word_embeddings", False)
    if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and tied):
        return []
    for old, new in getattr(model, "renamed_params", []):  # checkpoint module names the model spells otherwise
        name = name.replace(old, new)
    if any(part in name for part in getattr(model, "ignored_params", ())):  # tensors the model has no use for
        return []
    expert = _EXPERT.fullmatch(name)
    if expert and expert[3] in getattr(model, "expert_params", {}):  # one expert's tensor -> its stacked parameter
        param, shard = model.expert_params[expert[3]]
        return [(f"{expert[1]}.{param}", expert_index(param, int(expert[2]), shard))]
    for fused, shard, index in getattr(model, "stacked_params", []):
        if f".{shard}." in name:
            return [(name.replace(f".{shard}.", f".{fused}."), index)]
    if tied and name == "model.embed_tokens.weight" and "lm_head.weight" in params:  # a last stage's own copy
        return [(name, 0), ("lm_head.weight", 0)]
    return [(name, 0)]


def _prefused_parts(model: nn.Module, params: dict[str, nn.Parameter], name: str, weight: Weight) -> list[tuple[str, int, Weight]]:
    """A checkpoint tensor stored already fused (Phi-3's qkv_proj and gate_up_proj; the model lists them in
    `prefused_params`), cut into the rows of each tensor fused there, as (parameter, index, rows): the layer then
    takes each part as it takes separate q/k/v tensors, so tensor parallelism slices them alike. [] otherwise."""
    if name not in params or not any(f".{f}." in name for f in getattr(model, "prefused_params", ())):
        return []
    parts, start = [], 0
    for index, shape in enumerate(_checkpoint_shapes(model, name, params[name])):
        parts.append((name, index, row_range(weight, start, shape[0])))
        start += shape[0]
    if start != weight_shape(weight)[0]:
        raise ValueError(f"Checkpoint weight {name!r} has {weight_shape(weight)[0]} rows, its parts {start}.")
    return parts


def _checkpoint_name(model: nn.Module, name: str, index: int) -> str:
    """`_targets`' inverse: the checkpoint tensor loaded into parameter `name` at `index`."""
    for fused, shard, i in getattr(model, "stacked_params", []):
        if i == index and f".{fused}." in name:
            return name.replace(f".{fused}.", f".{shard}.")
    return name


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def _optional(model: nn.Module, name: str) -> bool:
    """A quantized layer's parameter that checkpoints of its format may leave out."""
    method = getattr(_owner(model, name), "quant_method", None)
    return method is not None and name.rpartition(".")[2] in method.optional_params


def _load_param(model: nn.Module, name: str, param: nn.Parameter, weight: Weight, index: int) -> None:
    owner = _owner(model, name)
    method, leaf = getattr(owner, "quant_method", None), name.rpartition(".")[2]
    if method is not None and leaf in method.param_names:
        method.load_param(owner, leaf, param, weight, index)
        return
    if _dtype_name(weight).startswith("F8") and not str(param.dtype).startswith("torch.float8"):
        raise ValueError(f"Checkpoint weight {name!r} is fp8 but its layer is not quantized "
                         "(check the quantization_config's ignore list).")
    loader = getattr(owner, "weight_loader", None)
    if loader is None:
        load_whole(param, weight, name)
    else:
        loader(param, weight, index)


def _dtype_name(weight: Weight) -> str:
    """safetensors' spelling (F8_E4M3, BF16, ...) of a weight's dtype."""
    if isinstance(weight, torch.Tensor):
        return "F8" if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else str(weight.dtype)
    return str(weight.get_dtype())


def _checkpoint_shapes(model: nn.Module, name: str, param: nn.Parameter) -> list[tuple[int, ...]]:
    """Full shapes of the checkpoint tensors that parameter `name` holds (a slice of)."""
    owner = _owner(model, name)
    return owner.checkpoint_shapes(param) if hasattr(owner, "checkpoint_shapes") else [tuple(param.shape)]


def _randomize(model: nn.Module) -> None:
    """Random weights of the real shapes (speed does not depend on their values). Each parameter's full,
    unsharded value is drawn from a generator seeded by its name and sliced like a checkpoint tensor,
    so every tensor/pipeline layout holds the same model."""
    tied = getattr(model, "tie_word_embeddings", False)
    for name, param in model.named_parameters():
        if "norm" in name.lower():  # RMSNorm / LayerNorm: identity scales, zero shifts
            param.data.fill_(0.0 if name.endswith(".bias") else 1.0)
            continue
        key = "model.embed_tokens.weight" if tied and name == "lm_head.weight" else name
        generator = torch.Generator(device=param.device).manual_seed(zlib.crc32(key.encode()))
        shapes = _checkpoint_shapes(model, name, param)
        owner = _owner(model, name)
        method = getattr(owner, "quant_method", None)
        if method is not None and name.rpartition(".")[2] in method.param_names:
            # the method's own stored format (GGUF blocks), per checkpoint tensor: their types may differ
            for index, shape in enumerate(shapes):
                weight = method.random_weight(owner, _checkpoint_name(model, name, index), shape[0], generator)
                _load_param(model, name, param, weight, index)
            continue
        rows = [shape[0] for shape in shapes]
        full = torch.empty((sum(rows), *shapes[0][1:]), dtype=param.dtype, device=param.device).normal_(0.0, 0.02, generator=generator)
        for index, part in enumerate(full.split(rows)):
            _load_param(model, name, param, part, index)
