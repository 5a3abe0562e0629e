"""The EAGLE draft head for Llama-family targets (EAGLE-1, SafeAILab's checkpoint layout; vLLM's method "eagle").

The head predicts the target's next feature from its last one: at position p it takes the embedding of token p + 1
and the target's final hidden state at p, `fc` maps their concatenation [2H] to H, then one Llama decoder layer (the
first without its input norm) runs with a KV cache of its own; the target's LM head reads the result (no final
norm). Drafting further, it feeds its own output in place of the target's hidden state.

Checkpoint tensors: `fc.weight` (and `fc.bias` where the head was trained with one), `layers.N.*` as a Llama layer's
(layer 0 without `input_layernorm`), and `embed_tokens.weight` unless the head shares the target's embedding. The
head's config.json is a LlamaConfig; `spec_decode/eagle.py` loads it under this class whatever its `architectures`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.layers.embedding import VocabParallelEmbedding
from pagedllm.layers.linear import Linear
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class EagleLlamaForCausalLM(nn.Module):
    stacked_params = LlamaForCausalLM.stacked_params

    def __init__(self, config: Any) -> None:
        """config.eagle_fc_bias / eagle_own_embedding: what the checkpoint holds (spec_decode/eagle.py reads it)."""
        super().__init__()
        hidden = config.hidden_size
        if getattr(config, "eagle_own_embedding", True):
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden)
        self.fc = Linear(2 * hidden, hidden, bias=bool(getattr(config, "eagle_fc_bias", False)))
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        rotary = RotaryEmbedding(config, head_dim, config.max_position_embeddings)
        bias = bool(getattr(config, "attention_bias", False))
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, bias, bias, False, rotary)
                                    for _ in range(config.num_hidden_layers))
        self.layers[0].input_layernorm = nn.Identity()
        self.hidden_in: torch.Tensor | None = None  # [tokens, H]: the features beside input_ids, set before a forward
        self.lm_head: nn.Module | None = None  # the target's, attached after loading

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        features = self.hidden_in
        if features is None or features.shape[0] != input_ids.shape[0]:  # the runner's warm-up and profile passes
            features = torch.zeros(input_ids.shape[0], self.fc.in_features // 2, dtype=self.fc.weight.dtype,
                                   device=input_ids.device)
        x = self.fc(torch.cat([self.embed_tokens(input_ids), features.to(self.fc.weight.dtype)], dim=-1))
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        return x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The target's LM head on the head's output (None before it is attached: the runner's profile pass)."""
        return None if self.lm_head is None else self.lm_head(hidden)
