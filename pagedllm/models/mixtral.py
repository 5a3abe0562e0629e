"""Mixtral: the Mistral (Llama) network with every feed-forward a sparse mixture of experts whose top-k routing
weights are always renormalised (pagedllm/layers/moe.py). Checkpoints name the block `block_sparse_moe` and an
expert's gate/down/up projections w1/w2/w3; the model keeps Llama's `mlp` attribute and renames on load."""

from __future__ import annotations

from typing import Any

from torch import nn

from pagedllm.layers.moe import DOWN, GATE, UP, SparseMoeBlock
from pagedllm.models.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    renamed_params = [(".block_sparse_moe.", ".mlp.")]
    expert_params = {"w1": ("w13", GATE), "w3": ("w13", UP), "w2": ("w2", DOWN)}

    def make_mlp(self, config: Any, layer: int) -> nn.Module | None:
        return SparseMoeBlock(config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                              config.intermediate_size, True, getattr(config, "enable_expert_parallel", False))
