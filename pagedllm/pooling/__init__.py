"""Pooling models: a prompt's hidden states pooled into one vector (embeddings), as vLLM's `runner="pooling"`."""

from pagedllm.pooling.params import PoolingParams

__all__ = ["PoolingParams"]
