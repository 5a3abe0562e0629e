"""POST /v1/embeddings, as OpenAI defines it: `input` a string, strings, token ids or lists of them; one vector each,
float or base64 (little-endian float32, as the OpenAI client decodes it); `dimensions` where the model was trained
for Matryoshka truncation. Only a model run as a pooling model that embeds serves it (400 otherwise: a classifier's
label scores are no embedding, it has /classify); it generates nothing (the completion endpoints answer 400)."""

from __future__ import annotations

import base64

import numpy as np
from starlette.responses import Response

from pagedllm.entrypoints.openai.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, UsageInfo, random_id
from pagedllm.entrypoints.openai.serving_base import json_response
from pagedllm.entrypoints.openai.serving_completion import prompts_of
from pagedllm.entrypoints.openai.serving_pooling import PoolingServing
from pagedllm.pooling.params import PoolingParams


class EmbeddingServing(PoolingServing):
    async def create(self, request: EmbeddingRequest, arrival_time: float) -> Response:
        self.check_pooling(request.model, "/v1/embeddings", ("embed",))
        prompts = prompts_of(request.input, "input")
        request_id = random_id("embd")
        outputs = await self.pool(request_id, prompts, PoolingParams(dimensions=request.dimensions), arrival_time,
                                  {"dimensions": "dimensions", "prompt": "input"})
        data, tokens = [], 0
        for index, output in enumerate(outputs):
            tokens += len(output.prompt_token_ids)
            vector = output.outputs.embedding
            encoded: list[float] | str = vector if request.encoding_format == "float" else \
                base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
            data.append(EmbeddingData(embedding=encoded, index=index))
        return json_response(EmbeddingResponse(id=request_id, model=self.model_name, data=data,
                                               usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens)))
