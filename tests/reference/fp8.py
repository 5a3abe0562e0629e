"""FP8 references, written apart from pagedllm/quantization (block loops rather than padded views):
the checkpoint writer `make_fp8_checkpoint` (compressed-tensors float-quantized per channel, HF fine-grained
block-wise, AutoFP8-style per-tensor with static input and KV scales) and `fp8_oracle`, transformers' model with
each linear's weight replaced by its fp8 quantize -> dequantize and its input fake-quantized as the format says."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

E4M3_MAX = 448.0
BLOCK = 128
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# format -> (weight scales, activation scheme)
SCHEMES = {"online": ("channel", "token"), "compressed-tensors": ("channel", "token"), "fp8-block": ("block", "group"),
           "fp8-tensor": ("tensor", "static")}


def ref_scale(amax: torch.Tensor) -> torch.Tensor:
    return (amax.float() / E4M3_MAX).clamp(min=1e-12)


def ref_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_weight(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, scales): channel [N, 1], tensor [] or block [ceil(N/128), ceil(K/128)], each block on its own."""
    if kind == "channel":
        scale = ref_scale(w.abs().amax(dim=1, keepdim=True))
        return ref_quant(w, scale), scale
    if kind == "tensor":
        scale = ref_scale(w.abs().amax())
        return ref_quant(w, scale), scale
    rows, cols = -(-w.shape[0] // BLOCK), -(-w.shape[1] // BLOCK)
    q, grid = torch.empty(w.shape, dtype=torch.float8_e4m3fn), torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            block = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
            grid[i, j] = ref_scale(block.abs().amax())
            q[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = ref_quant(block, grid[i, j])
    return q, grid


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    if kind != "block":
        return q.float() * scale
    full = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            full[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = scale[i, j]
    return q.float() * full


def fake_quant_input(x: torch.Tensor, scheme: str, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    if scheme == "static":
        assert input_scale is not None
        return (ref_quant(x, input_scale).float() * input_scale).to(x.dtype)
    out = torch.empty_like(x)
    width = x.shape[-1] if scheme == "token" else BLOCK
    for j in range(0, x.shape[-1], width):
        part = x[..., j : j + width]
        scale = ref_scale(part.abs().amax(dim=-1, keepdim=True))
        out[..., j : j + width] = (ref_quant(part, scale).float() * scale).to(x.dtype)
    return out


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in TARGETS}


@torch.inference_mode()
def calibrate(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Static input scales: amax over a few random prompts of each target linear's input / 448."""
    amax: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: amax.__setitem__(n, torch.maximum(amax.get(n, torch.tensor(0.0)),
                                                                                             a[0].abs().amax())))
             for n, m in _linears(model).items()]
    ids = torch.randint(3, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(seed))
    model(ids)
    for h in hooks:
        h.remove()
    return {n: ref_scale(a) for n, a in amax.items()}


def make_fp8_checkpoint(src: str, dst: str, fmt: str) -> str:
    """Writes `src`'s model (a float checkpoint) to `dst` in FP8 format `fmt` (compressed-tensors, fp8-block,
    fp8-tensor); tokenizer and generation files copied."""
    from transformers import AutoModelForCausalLM

    if os.path.exists(os.path.join(dst, "config.json")):
        return dst
    os.makedirs(dst, exist_ok=True)
    weights_kind, act = SCHEMES[fmt]
    tensors = load_file(os.path.join(src, "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    input_scales = calibrate(model) if act == "static" else {}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or module.rpartition(".")[2] not in TARGETS:
            out[name] = t.contiguous()
            continue
        q, scale = quantize_weight(t.float(), weights_kind)
        out[name] = q
        out[f"{module}.weight_scale_inv" if fmt == "fp8-block" else f"{module}.weight_scale"] = scale.contiguous()
        if module in input_scales:
            out[f"{module}.input_scale"] = input_scales[module].reshape(())
    if fmt == "fp8-tensor":  # per-layer KV-cache scales, as fp8 checkpoints with a KV scheme carry them
        for i in range(model.config.num_hidden_layers):
            out[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.5 + i / 8)
            out[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.25 + i / 8)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(src, "config.json")))
    config["quantization_config"] = quantization_config(fmt)
    json.dump(config, open(os.path.join(dst, "config.json"), "w"), indent=2)
    for f in os.listdir(src):
        if f not in ("config.json", "model.safetensors") and os.path.isfile(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), dst)
    return dst


def quantization_config(fmt: str) -> dict[str, Any]:
    if fmt == "fp8-block":  # transformers' FineGrainedFP8Config
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK],
                "modules_to_not_convert": ["lm_head"]}
    if fmt == "fp8-tensor":  # AutoFP8 / vLLM's Fp8Config, static activation scales
        return {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
    args = dict(num_bits=8, type="float", symmetric=True, group_size=None, block_structure=None, actorder=None)
    return {  # as llm-compressor writes FP8_DYNAMIC (compressed-tensors' QuantizationConfig)
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "output_activations": None, "format": "float-quantized",
            "weights": {**args, "strategy": "channel", "dynamic": False, "observer": "minmax"},
            "input_activations": {**args, "strategy": "token", "dynamic": True, "observer": None},
        }},
        "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None,
    }


def install_fp8_hooks(model: nn.Module, fmt: str, quantize_weights: bool = True) -> None:
    """Each target linear: weight -> its fp8 quantize -> dequantize (unless already dequantized), input fake-quantized."""
    weights_kind, act = SCHEMES[fmt]
    input_scales = calibrate(model) if act == "static" else {}
    for name, linear in _linears(model).items():
        if quantize_weights:
            with torch.no_grad():
                linear.weight.copy_(dequantize_weight(*quantize_weight(linear.weight.float(), weights_kind), weights_kind))
        scale = input_scales.get(name)
        linear.register_forward_pre_hook(lambda m, a, s=scale: (fake_quant_input(a[0], act, s),))


def fp8_oracle(src: str, fmt: str) -> Any:
    """HFOracle (tests/reference/models.py) over transformers' model of `src` with `fmt`'s fp8 math hooked in."""
    from tests.reference.models import HFOracle

    oracle = HFOracle(src)
    install_fp8_hooks(oracle.model, fmt)
    return oracle
