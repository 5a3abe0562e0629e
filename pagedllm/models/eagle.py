"""EAGLE draft heads for Llama-family targets, in SafeAILab's checkpoint layouts: EAGLE-1 (vLLM's method "eagle") and
EAGLE-3 ("eagle3", at the end of this file).

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

from pagedllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.layers.linear import Linear
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP


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

    def draft_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """The greedy draft (a target token id) from each output feature."""
        logits = self.compute_logits(features)
        assert logits is not None
        return logits.argmax(dim=-1)


class Eagle3LlamaForCausalLM(nn.Module):
    """EAGLE-3: the target's residual stream entering three of its layers (low, middle, high: 3H, kept by the target's
    forward, models/llama.py `aux_layers`) goes through `fc` to H; drafting further, the head's own H-wide output
    feature stands in. One `midlayer`: its attention reads [input_layernorm(embedding); hidden_norm(feature)] (2H),
    the feature being the residual; then the usual MLP. `norm` and an own LM head over a smaller draft vocabulary
    (`lm_head`, draft_vocab_size rows), whose ids map to the target's by `d2t` offsets (`t2d` is not needed).
    Checkpoint tensors: fc.weight, midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight,
    midlayer.self_attn.{q,k,v,o}_proj.weight, midlayer.mlp.{gate,up,down}_proj.weight, norm.weight, lm_head.weight,
    d2t, t2d, and embed_tokens.weight unless the target's is shared."""

    stacked_params = LlamaForCausalLM.stacked_params

    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        if getattr(config, "eagle_own_embedding", True):
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden)
        target_hidden = getattr(config, "target_hidden_size", None) or hidden
        self.fc = Linear(3 * target_hidden, hidden, bias=False)
        self.midlayer = nn.Module()
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        rotary = RotaryEmbedding(config, head_dim, config.max_position_embeddings)
        self.midlayer.input_layernorm = RMSNorm(hidden, eps)
        self.midlayer.hidden_norm = RMSNorm(hidden, eps)
        self.midlayer.self_attn = LlamaAttention(config, False, False, False, rotary, in_features=2 * hidden)
        self.midlayer.post_attention_layernorm = RMSNorm(hidden, eps)
        self.midlayer.mlp = LlamaMLP(config)
        self.norm = RMSNorm(hidden, eps)
        draft_vocab = getattr(config, "draft_vocab_size", None) or config.vocab_size
        self.lm_head = ParallelLMHead(hidden, draft_vocab)
        self.d2t = nn.Parameter(torch.zeros(draft_vocab, dtype=torch.int64), requires_grad=False)
        self.t2d = nn.Parameter(torch.zeros(config.vocab_size, dtype=torch.bool), requires_grad=False)
        self.hidden_in: torch.Tensor | None = None  # [tokens, 3H] (the target's layers) or [tokens, H] (own output)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        features = self.hidden_in
        if features is None or features.shape[0] != input_ids.shape[0]:  # the runner's warm-up and profile passes
            features = torch.zeros(input_ids.shape[0], self.fc.in_features, dtype=self.fc.weight.dtype,
                                   device=input_ids.device)
        features = features.to(self.fc.weight.dtype)
        residual = self.fc(features) if features.shape[-1] == self.fc.in_features else features
        layer = self.midlayer
        x = torch.cat([layer.input_layernorm(self.embed_tokens(input_ids)), layer.hidden_norm(residual)], dim=-1)
        x = layer.self_attn(positions, x) + residual
        return layer.mlp(layer.post_attention_layernorm(x)) + x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the draft vocabulary (never sampled by the runner: `draft_tokens` maps them)."""
        return None

    def draft_tokens(self, features: torch.Tensor) -> torch.Tensor:
        best = self.lm_head(self.norm(features)).argmax(dim=-1)
        return best + self.d2t[best]
