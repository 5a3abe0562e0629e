"""BERT-family encoders (BERT as in all-MiniLM-L6-v2, RoBERTa / XLM-R) and their sequence-classification heads
(cross-encoders for reranking), run as pooling models.

An encoder's prompts run whole in one step with bidirectional attention and no KV cache (layers/attention.py's
EncoderAttention); the model returns the last hidden states of the flat batch, which the pooler reduces per prompt.
Post-LayerNorm blocks: x = LN(x + attention(x)), x = LN(x + FFN(x)). Token-type (segment) ids come from the step's
forward context (a cross-encoder's query / document pairs); positions are absolute, from 0 for BERT and from
pad_token_id + 1 for RoBERTa / XLM-R (as transformers numbers the tokens of an unpadded prompt).

Module names follow transformers', so checkpoints load as they are; q/k/v load into one fused projection, which
tensor parallelism splits by heads as in the decoders.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.parallel_state import get_parallel_state
from pagedllm.layers.attention import EncoderAttention, current_token_type_ids
from pagedllm.layers.embedding import VocabParallelEmbedding
from pagedllm.layers.linear import ColumnParallelLinear, RowParallelLinear, qkv_shards, split_rows

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class BertEmbeddings(nn.Module):
    def __init__(self, config: Any, position_offset: int) -> None:
        super().__init__()
        self.position_offset = position_offset
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(max(1, config.type_vocab_size), config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        token_types = current_token_type_ids()
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions + self.position_offset)
        if token_types is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_types)
        return self.LayerNorm(x)


class _SelfOutput(nn.Module):
    """The projection after attention (or after the FFN's activation), then LayerNorm(x + residual)."""

    def __init__(self, in_features: int, config: Any, shard: Any = None) -> None:
        super().__init__()
        self.dense = RowParallelLinear(in_features, config.hidden_size, bias=True, shard=shard)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        shards = qkv_shards(head_dim, heads, heads)
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, shards, bias=True)
        local_heads = shards[0].size // head_dim
        self.attn = EncoderAttention(local_heads, local_heads, head_dim, head_dim**-0.5)
        self.output = _SelfOutput(config.hidden_size, config, shard=shards[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attn(self.qkv_proj(x)), x)


class _Intermediate(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        shard = split_rows(config.intermediate_size, get_parallel_state())
        self.dense = ColumnParallelLinear(config.hidden_size, [shard], bias=True)
        act = getattr(config, "hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported for encoders; supported: {', '.join(_ACTIVATIONS)}.")
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = _Intermediate(config)
        self.output = _SelfOutput(config.intermediate_size, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class BertModel(nn.Module):
    """The encoder alone (an embedding model): forward returns the last hidden states [T, hidden]."""

    is_encoder = True
    default_pooling = "CLS"  # vLLM's for BERT embedders without sentence-transformers files
    stacked_params = [
        ("attention.qkv_proj", "attention.self.query", 0), ("attention.qkv_proj", "attention.self.key", 1),
        ("attention.qkv_proj", "attention.self.value", 2),
    ]
    # Checkpoints of a task model nest the encoder under its name; a pooler an embedder doesn't use; a saved buffer.
    renamed_params = [("bert.", ""), ("roberta.", "")]
    ignored_params: tuple[str, ...] = ("pooler.", "embeddings.position_ids", "lm_head.", "cls.predictions")

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config, self.position_offset_for(config))
        self.encoder = BertEncoder(config)

    @classmethod
    def position_offset_for(cls, config: Any) -> int:
        """The position table's row of position 0: BERT numbers from 0."""
        return 0

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate: Any = None) -> torch.Tensor:
        return self.encoder(self.embeddings(input_ids, positions))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("an encoder has no language-model head: it only pools (embed, score, classify).")


class XLMRobertaModel(BertModel):
    @classmethod
    def position_offset_for(cls, config: Any) -> int:
        return int(getattr(config, "pad_token_id", 1) or 0) + 1


class _BertPooler(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, cls_rows: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_rows))


class BertForSequenceClassification(BertModel):
    """A classifier / cross-encoder: the first token's final state through BERT's pooler and a linear classifier.
    `classify` maps the pooled first-token rows [N, hidden] to logits [N, num_labels]."""

    ignored_params = ("embeddings.position_ids",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.pooler = _BertPooler(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def classify(self, cls_rows: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooler(cls_rows))


class _RobertaClassificationHead(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, cls_rows: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(cls_rows)))


class XLMRobertaForSequenceClassification(XLMRobertaModel):
    """RoBERTa's classification head (dense, tanh, out_proj) on the first token: bge-reranker and the like."""

    ignored_params = ("embeddings.position_ids", "pooler.")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.classifier = _RobertaClassificationHead(config)

    def classify(self, cls_rows: torch.Tensor) -> torch.Tensor:
        return self.classifier(cls_rows)
