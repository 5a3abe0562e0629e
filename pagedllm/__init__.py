"""pagedllm: a paged-KV-cache, continuously batching LLM inference engine."""

from pagedllm.entrypoints.llm import LLM
from pagedllm.lora.request import LoRARequest
from pagedllm.outputs import (
    ClassificationOutput, ClassificationRequestOutput, CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, Logprob,
    RequestOutput, ScoringOutput, ScoringRequestOutput,
)
from pagedllm.pooling.params import PoolingParams
from pagedllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "LoRARequest", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput", "Logprob", "RequestOutputKind",
           "StructuredOutputsParams", "PoolingParams", "EmbeddingOutput", "EmbeddingRequestOutput",
           "ClassificationOutput", "ClassificationRequestOutput", "ScoringOutput", "ScoringRequestOutput"]
__version__ = "0.1.0"
