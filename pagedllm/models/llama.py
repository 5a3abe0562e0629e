"""Llama-family decoder (Llama 2/3, SmolLM2); Qwen2 and Qwen3 are the same network with
q/k/v biases or per-head q/k norms, so they subclass this file with two flags.

The model takes one flat batch: token ids [T] and positions [T] of every scheduled token; the
attention layer finds each token's request through the forward context. Under tensor parallelism
each rank builds its own slice of every layer (the layers read the TP group); under pipeline
parallelism a stage builds only its layers and passes (hidden, residual) on to the next.
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Callable

import torch
from torch import nn

from pagedllm.distributed.parallel_state import get_parallel_state
from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.attention import Attention, layer_sliding_window
from pagedllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.layers.linear import ColumnParallelLinear, RowParallelLinear, qkv_shards, split_rows
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.pipeline import MissingLayer, stage_layers
from pagedllm.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, qkv_bias: bool, o_bias: bool, qk_norm: bool, rotary: RotaryEmbedding,
                 in_features: int | None = None) -> None:
        """in_features: q/k/v's input width, if not hidden_size (an EAGLE-3 head's [embedding; feature])."""
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        shards = qkv_shards(self.head_dim, num_heads, num_kv_heads)
        self.num_heads, self.num_kv_heads = shards[0].size // self.head_dim, shards[1].size // self.head_dim  # this rank's
        self.qkv_proj = ColumnParallelLinear(in_features or config.hidden_size, shards, bias=qkv_bias)
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, config.hidden_size, bias=o_bias, shard=shards[0])  # its q heads' columns
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, rotary)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attn(positions, self.qkv_proj(x), self.q_norm, self.k_norm))


class LlamaMLP(nn.Module):
    # (producer, linear reading only its output): an FP8 method makes the producer quantize (quantization/fp8.py)
    activation_producers = (("act", "down_proj"),)

    def __init__(self, config: Any, intermediate_size: int | None = None) -> None:
        """intermediate_size: other than config's for an MoE model's shared expert."""
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        shard = split_rows(inter, get_parallel_state())
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [shard, shard], bias=False)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=False)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    activation_producers = (("input_layernorm", "self_attn.qkv_proj"), ("post_attention_layernorm", "mlp.gate_up_proj"))

    def __init__(self, config: Any, qkv_bias: bool, o_bias: bool, qk_norm: bool, rotary: RotaryEmbedding,
                 mlp: nn.Module | None = None) -> None:
        """mlp: the feed-forward block if not Llama's (an MoE model's sparse block)."""
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, qkv_bias, o_bias, qk_norm, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config) if mlp is None else mlp

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it); the next norm adds them."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, qkv_bias: bool, o_bias: bool, qk_norm: bool,
                 make_mlp: Callable[[Any, int], nn.Module | None] = lambda config, layer: None) -> None:
        """make_mlp(config, layer index): that layer's feed-forward block (None: LlamaMLP)."""
        super().__init__()
        state = get_parallel_state()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size) if state.is_first_stage else MissingLayer()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary = RotaryEmbedding(config, head_dim, config.max_position_embeddings)
        local = stage_layers(config.num_hidden_layers)
        self.start_layer, self.end_layer = local.start, local.stop
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, qkv_bias, o_bias, qk_norm, rotary, make_mlp(config, i)) if i in local else MissingLayer()
            for i in range(config.num_hidden_layers)
        )
        for i in local:  # Mistral's and Phi-3's window on every layer, Qwen2's on its sliding layers
            self.layers[i].self_attn.attn.sliding_window = layer_sliding_window(config, i)
        self.is_last_stage = state.is_last_stage
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if state.is_last_stage else MissingLayer()
        # EAGLE-3 (spec_decode/eagle.py): layers whose input residual stream the forward also writes to aux_buffer
        self.aux_layers: tuple[int, ...] = ()
        self.aux_buffer: torch.Tensor | None = None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The final hidden states on the last stage; elsewhere (hidden, residual), which the next
        stage passes back in as `intermediate` (the first stage embeds `input_ids` instead)."""
        x, residual = (self.embed_tokens(input_ids), None) if intermediate is None else intermediate
        if self.aux_layers:
            return self._forward_aux(positions, x, residual)
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            x, residual = layer(positions, x, residual)
        if not self.is_last_stage:
            return x, residual
        return self.norm(x, residual)[0]


    def _forward_aux(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The forward of one stage that also writes the residual stream entering each of `aux_layers` (ascending; one
        slot per entry) into `aux_buffer` [tokens, len(aux_layers) * hidden], in place: an EAGLE-3 head reads them, and CUDA graphs
        replay the copies into the same persistent buffer."""
        assert self.aux_buffer is not None and self.is_last_stage
        width, tokens = x.shape[-1], x.shape[0]
        for i in range(self.start_layer, self.end_layer):
            for j in (j for j, layer in enumerate(self.aux_layers) if layer == i):
                self.aux_buffer[:tokens, j * width : (j + 1) * width].copy_(x if residual is None else x + residual)
            x, residual = self.layers[i](positions, x, residual)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    qkv_bias: bool | None = None  # None: from config.attention_bias
    qk_norm = False
    # HF checkpoint names that this model loads into one fused parameter: (fused, shard, index).
    stacked_params = [
        ("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
        ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
    ]

    def __init__(self, config: Any) -> None:
        super().__init__()
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = attention_bias if self.qkv_bias is None else self.qkv_bias
        o_bias = attention_bias and self.qkv_bias is None  # Qwen2 biases q/k/v only
        self.model = LlamaModel(config, qkv_bias, o_bias, self.qk_norm, self.make_mlp)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size) if get_parallel_state().is_last_stage else MissingLayer()
        self.tie_weights()

    def make_mlp(self, config: Any, layer: int) -> nn.Module | None:
        """Layer `layer`'s feed-forward block; None: LlamaMLP (MoE models override this)."""
        return None

    def tie_weights(self) -> None:
        """With tied embeddings the output projection is the embedding matrix itself (re-tie after `to_empty`);
        a last pipeline stage without the embedding loads its own copy of it."""
        if self.tie_word_embeddings and isinstance(self.lm_head, ParallelLMHead) and isinstance(self.model.embed_tokens, VocabParallelEmbedding):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.model(input_ids, positions, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Full logits on the last stage's TP rank 0, None on its other ranks."""
        return self.lm_head(hidden)
