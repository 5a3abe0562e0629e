"""Weight (and activation) quantization methods, picked per engine by `get_quant_method`: `EngineConfig.quantization`
(e.g. "fp8": a 16-bit checkpoint quantized at load), else the checkpoint's config.json `quantization_config`."""

from __future__ import annotations

from typing import Any, Callable

from pagedllm.quantization import compressed_tensors, fp8
from pagedllm.quantization.base import QuantMethod

# name -> from_config(checkpoint's quantization_config or None, serialized) -> QuantMethod
QUANTIZATION_METHODS: dict[str, Callable[[dict[str, Any] | None, bool], QuantMethod]] = {
    "fp8": fp8.from_config,
    "compressed-tensors": lambda qc, serialized: compressed_tensors.from_config(qc or {}, serialized),
}


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
    name = quantization or stored
    if name is None:
        return None
    if name not in QUANTIZATION_METHODS:
        raise ValueError(f"Unsupported quantization method {name!r}; supported: {', '.join(QUANTIZATION_METHODS)}.")
    if stored is not None and name != stored:
        raise ValueError(f"The checkpoint is quantized with {stored!r}; quantization={name!r} cannot requantize it "
                         "(leave quantization unset).")
    return QUANTIZATION_METHODS[name](qc, stored is not None and load_format != "dummy")


def get_quant_method(config: Any) -> QuantMethod | None:
    """For an `EngineConfig` (hf_config resolved): its quantization method, or None for unquantized models."""
    return resolve_quant_method(config.hf_config, config.quantization, config.load_format)


__all__ = ["QUANTIZATION_METHODS", "QuantMethod", "get_quant_method", "resolve_quant_method"]
