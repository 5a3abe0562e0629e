"""Qwen2-MoE and Qwen3-MoE: the Qwen2 / Qwen3 networks (q/k/v biases, or per-head q/k norms) with the feed-forward
of most layers replaced by a sparse mixture of experts (pagedllm/layers/moe.py).

A layer is sparse unless listed in `mlp_only_layers` or off the `decoder_sparse_step` grid (transformers' rule);
the others keep a dense MLP of `intermediate_size`. Qwen2-MoE adds to every sparse block a shared expert, a dense
MLP that sees every token (split over TP ranks, expert parallel or not), scaled per token by
sigmoid(shared_expert_gate(x)). Routing weights are renormalised
over the top k where `norm_topk_prob` says so (Qwen3-MoE's checkpoints: yes; Qwen2-MoE's: no).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.layers.linear import Linear
from pagedllm.layers.moe import DOWN, GATE, UP, SparseMoeBlock
from pagedllm.models.llama import LlamaForCausalLM, LlamaMLP


def is_sparse(config: Any, layer: int) -> bool:
    step = getattr(config, "decoder_sparse_step", 1) or 1
    dense = getattr(config, "mlp_only_layers", None) or []
    return layer not in dense and config.num_experts > 0 and (layer + 1) % step == 0


class Qwen2MoeSparseBlock(SparseMoeBlock):
    def __init__(self, config: Any) -> None:
        super().__init__(config.hidden_size, config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                         bool(config.norm_topk_prob), getattr(config, "enable_expert_parallel", False))
        self.shared_expert = LlamaMLP(config, config.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)  # replicated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().forward(x) + shared


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    qk_norm = True
    expert_params = {"gate_proj": ("w13", GATE), "up_proj": ("w13", UP), "down_proj": ("w2", DOWN)}

    def make_mlp(self, config: Any, layer: int) -> nn.Module | None:
        if not is_sparse(config, layer):
            return None
        return SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                              config.moe_intermediate_size, bool(config.norm_topk_prob),
                              getattr(config, "enable_expert_parallel", False))


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    qk_norm = False
    qkv_bias = True

    def make_mlp(self, config: Any, layer: int) -> nn.Module | None:
        return Qwen2MoeSparseBlock(config) if is_sparse(config, layer) else None
