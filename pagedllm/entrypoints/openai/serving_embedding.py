"""POST /v1/embeddings, as OpenAI defines it: `input` a string, strings, token ids or lists of them; one vector each,
float or base64 (little-endian float32, as the OpenAI client decodes it); `dimensions` where the model was trained
for Matryoshka truncation. Only a model run as a pooling model embeds (400 otherwise); it generates nothing (the
completion endpoints answer 400)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
from starlette.responses import Response

from pagedllm.entrypoints.openai.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, UsageInfo, random_id
from pagedllm.entrypoints.openai.serving_base import APIError, OpenAIServing, json_response, value_error
from pagedllm.entrypoints.openai.serving_completion import prompts_of
from pagedllm.engine.async_engine import RequestStream
from pagedllm.pooling.params import PoolingParams


class EmbeddingServing(OpenAIServing):
    async def create(self, request: EmbeddingRequest, arrival_time: float) -> Response:
        self.check_model(request.model)
        if self.engine.config.runner != "pooling":
            raise APIError("This model does not support embeddings: start it with --runner pooling.", 400, param="model")
        prompts = prompts_of(request.input, "input")
        request_id = random_id("embd")
        stream = RequestStream()
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        params = PoolingParams(dimensions=request.dimensions)
        adds = [self.engine.add_request(rid, prompt, params, arrival_time, stream) for rid, prompt in zip(ids, prompts)]
        results = await asyncio.gather(*adds, return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            self.engine.abort(ids)
            if isinstance(failed, ValueError):
                raise value_error(failed, {"dimensions": "dimensions", "prompt": "input"}) from None
            raise failed
        vectors: dict[str, Any] = {}
        async for output in stream:
            vectors[output.request_id] = output
        data, tokens = [], 0
        for index, rid in enumerate(ids):
            output = vectors[rid]
            tokens += len(output.prompt_token_ids)
            vector = output.outputs.embedding
            encoded: list[float] | str = vector if request.encoding_format == "float" else \
                base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
            data.append(EmbeddingData(embedding=encoded, index=index))
        return json_response(EmbeddingResponse(id=request_id, model=self.model_name, data=data,
                                               usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens)))
