"""Weight (and activation) quantization methods, picked per engine by `get_quant_method`: `EngineConfig.quantization`
(e.g. "fp8": a 16-bit checkpoint quantized at load), else the checkpoint's config.json `quantization_config`.

GGUF is not in the table: a .gguf model is converted to a dense directory (pagedllm/models/gguf.py), which CPU runs;
on CUDA the loader gives its decoder linears `GgufLinearMethod` (quantization/gguf.py: the file's blocks, dequantizing
kernels) whether or not quantization="gguf" is passed. quantization="gguf" with load_format="dummy" is random blocks
in llama.cpp's Q4_K_M mix on any config (benchmarks); otherwise it needs a .gguf model."""

from __future__ import annotations

from typing import Any, Callable

from pagedllm.quantization import awq, compressed_tensors, fp8, gptq
from pagedllm.quantization.base import QuantMethod
from pagedllm.models.gguf import SOURCE_KEY
from pagedllm.quantization.gguf import GgufLinearMethod

# name -> from_config(checkpoint's quantization_config or None, serialized) -> QuantMethod
QUANTIZATION_METHODS: dict[str, Callable[[dict[str, Any] | None, bool], QuantMethod]] = {
    "fp8": fp8.from_config,
    "compressed-tensors": lambda qc, serialized: compressed_tensors.from_config(qc or {}, serialized),
    "gptq": gptq.from_config,
    "awq": awq.from_config,
}
# vLLM's names for the same checkpoints run by other kernels
ALIASES = {"gptq_marlin": "gptq", "awq_marlin": "awq", "compressed_tensors": "compressed-tensors"}
# Methods that quantize a 16-bit checkpoint at load; the others need a checkpoint in their format (or dummy weights)
ONLINE = ("fp8",)


def checkpoint_quant_config(hf_config: Any) -> dict[str, Any] | None:
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None or isinstance(qc, dict):
        return qc
    return qc.to_dict()  # a transformers QuantizationConfig object


def resolve_quant_method(hf_config: Any, quantization: str | None, load_format: str = "auto") -> QuantMethod | None:
    """The method for a model: `quantization` (a flag) or its checkpoint's. Random dummy weights are 16-bit, so a
    quantized checkpoint's format is then applied at load, as `--quantization` does."""
    qc = checkpoint_quant_config(hf_config)
    stored = qc.get("quant_method") if qc else None
    stored = ALIASES.get(stored, stored)
    name = ALIASES.get(quantization, quantization) or stored
    if name is None:
        return None
    if name == "gguf" and stored is None:  # a .gguf file's method is the loader's, which knows the device
        return GgufLinearMethod(None, hf_config.num_hidden_layers) if load_format == "dummy" else None
    if name not in QUANTIZATION_METHODS:
        raise ValueError(f"Unsupported quantization method {name!r}; supported: "
                         f"{', '.join([*QUANTIZATION_METHODS, 'gguf'])}.")
    if stored is not None and name != stored:
        raise ValueError(f"The checkpoint is quantized with {stored!r}; quantization={name!r} cannot requantize it "
                         "(leave quantization unset).")
    if stored is None and name not in ONLINE and load_format != "dummy":
        raise ValueError(f"quantization={name!r} needs a checkpoint quantized with it, and this one's config.json has "
                         f"no quantization_config; {', '.join(ONLINE)} quantizes a 16-bit checkpoint at load.")
    return QUANTIZATION_METHODS[name](qc, stored is not None and load_format != "dummy")


def get_quant_method(config: Any) -> QuantMethod | None:
    """For an `EngineConfig` (hf_config resolved): its quantization method, or None for unquantized models."""
    from_gguf = getattr(config.hf_config, SOURCE_KEY, None) is not None
    if config.quantization == "gguf" and not from_gguf and config.load_format != "dummy":
        raise ValueError(f"quantization='gguf' needs a .gguf model file (or load_format='dummy': random Q4_K_M "
                         f"blocks); {config.model!r} is not one.")
    return resolve_quant_method(config.hf_config, config.quantization, config.load_format)


__all__ = ["QUANTIZATION_METHODS", "QuantMethod", "get_quant_method", "resolve_quant_method"]
