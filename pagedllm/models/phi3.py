"""Phi-3: the Llama network, but its checkpoints store q/k/v and gate/up already fused (`qkv_proj`,
`gate_up_proj`); the loader cuts those into the layer's parts (`prefused_params`), so tensor parallelism slices
them as it slices Llama's separate tensors. The sliding window (Phi-3-mini's 2047) applies to every layer.

LongRoPE ("su"/"longrope") configs get the short factors, which transformers uses while the sequence is within
original_max_position_embeddings; its switch to the long factors past that length is not implemented.
"""

from __future__ import annotations

from typing import Any

from pagedllm.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    stacked_params: list[tuple[str, str, int]] = []
    prefused_params = ("qkv_proj", "gate_up_proj")

    def __init__(self, config: Any) -> None:
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("Phi-3 models with a partial rotary embedding (partial_rotary_factor < 1) are not supported.")
        super().__init__(config)
