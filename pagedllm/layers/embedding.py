"""Vocabulary-parallel token embedding and LM head: each TP rank holds a contiguous block of
ceil(vocab / tp) rows (the last block zero-padded), the same block in both, so a tied LM head is
the embedding's own shard. Embedding lookups outside the block read zeros and one all-reduce
completes them; the LM head's logit blocks are gathered on the stage leader, where sampling runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.communication import tp_all_reduce, tp_gather
from pagedllm.distributed.parallel_state import get_parallel_state
from pagedllm.layers.linear import Linear
from pagedllm.layers.sharding import Weight, narrow, weight_shape


class _VocabShard:
    def __init__(self, vocab_size: int) -> None:
        state = get_parallel_state()
        self.state, self.vocab_size, self.tp_size = state, vocab_size, state.tp_size
        self.rows = -(-vocab_size // state.tp_size)
        self.start = state.tp_rank * self.rows
        self.valid = max(0, min(self.rows, vocab_size - self.start))  # rows past the vocabulary are padding

    def load(self, param: torch.Tensor, weight: Weight) -> None:
        if weight_shape(weight) != (self.vocab_size, param.shape[1]):
            raise ValueError(f"Shape mismatch: checkpoint {weight_shape(weight)}, expected {(self.vocab_size, param.shape[1])}.")
        param.data[: self.valid].copy_(narrow(weight, 0, self.start, self.valid))
        param.data[self.valid :].zero_()


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab = _VocabShard(vocab_size)
        self.weight = nn.Parameter(torch.empty(self.vocab.rows, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.vocab.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab.start
        outside = (local < 0) | (local >= self.vocab.valid)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return tp_all_reduce(out.masked_fill_(outside[:, None], 0.0), self.vocab.state)

    def checkpoint_shapes(self, param: torch.Tensor) -> list[tuple[int, ...]]:
        return [(self.vocab.vocab_size, param.shape[1])]

    def weight_loader(self, param: torch.Tensor, weight: Weight, index: int) -> None:
        self.vocab.load(param, weight)


class ParallelLMHead(Linear):
    """Returns the full logits [T, vocab] on the stage leader and None on the other TP ranks."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        vocab = _VocabShard(vocab_size)
        super().__init__(hidden_size, vocab.rows, bias=False)
        self.vocab = vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        logits = super().forward(x)
        if self.vocab.tp_size == 1:
            return logits
        full = tp_gather(logits, self.vocab.state)
        return None if full is None else full[:, : self.vocab.vocab_size]

    def checkpoint_shapes(self, param: torch.Tensor) -> list[tuple[int, ...]]:
        return [(self.vocab.vocab_size, param.shape[1])]

    def weight_loader(self, param: torch.Tensor, weight: Weight, index: int) -> None:
        self.vocab.load(param, weight)
