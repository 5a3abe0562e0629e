"""Gemma 2 and Gemma 3 (text): a Llama-shaped decoder with Gemma's own details, sharing pagedllm's layers.

- RMSNorm scales by (1 + weight): the loader stores 1 + weight, so the shared RMSNorm (and its fused CUDA kernels)
  run unchanged; four norms per layer (around attention and around the MLP), and Gemma 3's per-head q/k norms.
- GeGLU MLP (tanh-approximated GELU), embeddings scaled by sqrt(hidden) rounded to the model's dtype.
- Attention scale query_pre_attn_scalar ** -0.5; interleaved sliding-window (local) and global layers from the
  config's `layer_types`; Gemma 2 caps attention scores and final logits with tanh, Gemma 3 has per-layer-type
  rotary tables (local base 10k, global 1M with its scaling).
Every layer keeps its whole context in the KV cache: the global layers need it, and blocks are shared by layers.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

import torch
from torch import nn

from pagedllm.distributed.parallel_state import get_parallel_state
from pagedllm.layers.activation import GeluTanhAndMul
from pagedllm.layers.attention import Attention, layer_sliding_window
from pagedllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.layers.linear import ColumnParallelLinear, RowParallelLinear, qkv_shards, split_rows
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.pipeline import MissingLayer, stage_layers
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.layers.sharding import Weight, load_whole
from pagedllm.models.llama import LlamaForCausalLM


class GemmaRMSNorm(RMSNorm):
    """Holds 1 + the checkpoint's weight (added in float32, then stored in the model's dtype)."""

    def weight_loader(self, param: torch.Tensor, weight: Weight, index: int) -> None:
        load_whole(param, weight, "norm weight")
        param.data.copy_(param.data.float() + 1.0)


class GemmaAttention(nn.Module):
    def __init__(self, config: Any, layer: int, rotary: RotaryEmbedding, qk_norm: bool) -> None:
        super().__init__()
        head_dim = config.head_dim
        shards = qkv_shards(head_dim, config.num_attention_heads, config.num_key_value_heads)
        heads, kv_heads = shards[0].size // head_dim, shards[1].size // head_dim  # this rank's
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, shards, bias=bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, bias=bias, shard=shards[0])
        self.q_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = GemmaRMSNorm(head_dim, config.rms_norm_eps) if qk_norm else None
        self.attn = Attention(heads, kv_heads, head_dim, config.query_pre_attn_scalar**-0.5, rotary,
                              sliding_window=layer_sliding_window(config, layer),
                              soft_cap=getattr(config, "attn_logit_softcapping", None))

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attn(positions, self.qkv_proj(x), self.q_norm, self.k_norm))


class GemmaMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        if config.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"Gemma's MLP activation {config.hidden_activation!r} is not supported.")
        shard = split_rows(config.intermediate_size, get_parallel_state())
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [shard, shard], bias=False)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = GeluTanhAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer: int, rotary: RotaryEmbedding, qk_norm: bool) -> None:
        super().__init__()
        norm = lambda: GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.self_attn = GemmaAttention(config, layer, rotary, qk_norm)
        self.mlp = GemmaMLP(config)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """As Llama's layer: returns (this layer's normed MLP output, the residual before it); the next norm adds them."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaModel(nn.Module):
    def __init__(self, config: Any, rope_per_layer_type: bool, qk_norm: bool) -> None:
        super().__init__()
        state = get_parallel_state()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size) if state.is_first_stage else MissingLayer()
        # transformers multiplies by sqrt(hidden) rounded to the model's dtype (built under it: the default dtype).
        self.normalizer = float(torch.tensor(config.hidden_size**0.5, dtype=torch.get_default_dtype(), device="cpu"))
        types = sorted(set(config.layer_types)) if rope_per_layer_type else [None]
        rotaries = {t: RotaryEmbedding(config, config.head_dim, config.max_position_embeddings, t) for t in types}
        local = stage_layers(config.num_hidden_layers)
        self.start_layer, self.end_layer = local.start, local.stop
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, i, rotaries[config.layer_types[i] if rope_per_layer_type else None], qk_norm)
            if i in local else MissingLayer()
            for i in range(config.num_hidden_layers)
        )
        self.is_last_stage = state.is_last_stage
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps) if state.is_last_stage else MissingLayer()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings, scaled by sqrt(hidden) (a vision model's image rows replace them after that)."""
        return self.embed_tokens(input_ids) * self.normalizer

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """As LlamaModel.forward."""
        x, residual = (self.embed(input_ids), None) if intermediate is None else intermediate
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            x, residual = layer(positions, x, residual)
        if not self.is_last_stage:
            return x, residual
        return self.norm(x, residual)[0]


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Llama's wrapper (checkpoint fusing, tied LM head, pipeline stages) around the Gemma body."""

    rope_per_layer_type = False
    gemma_qk_norm = False

    def __init__(self, config: Any) -> None:
        nn.Module.__init__(self)
        self.model = GemmaModel(config, self.rope_per_layer_type, self.gemma_qk_norm)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size) if get_parallel_state().is_last_stage else MissingLayer()
        self.final_soft_cap: float | None = getattr(config, "final_logit_softcapping", None)
        self.tie_weights()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.lm_head(hidden)
        if logits is None or self.final_soft_cap is None:
            return logits
        return torch.tanh(logits / self.final_soft_cap) * self.final_soft_cap


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3's text model: per-head q/k norms and per-layer-type rotary tables; no attention soft cap."""

    rope_per_layer_type = True
    gemma_qk_norm = True
