"""vLLM's pooling endpoints: POST /v1/score and /rerank score (text_1, text_2) pairs, POST /classify gives a
classifier's label probabilities; `PoolingServing` is also the base of /v1/embeddings (serving_embedding.py).

A pair is scored the way `LLM.score` does it: a cross-encoder (a classifier with one label) reads the pair as one
prompt, the tokenizer's pair encoding with its segment ids; an embedding model embeds each distinct text once and
scores the cosine of the two vectors. Pairs are tokenized here, on the server's event loop, as every prompt is: the
engine core only runs them. What a model can serve follows from its pooling task (`pooling_task`), and anything it
cannot is a 400 naming the endpoint that fits."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from fastapi.responses import Response

from pagedllm.engine.llm_engine import PromptType
from pagedllm.entrypoints.openai.protocol import (
    ClassificationData, ClassificationRequest, ClassificationResponse, RerankDocument, RerankRequest, RerankResponse,
    RerankResult, RerankUsage, ScoreData, ScoreRequest, ScoreResponse, UsageInfo, random_id,
)
from pagedllm.entrypoints.openai.serving_base import APIError, OpenAIServing, engine_error, json_response
from pagedllm.entrypoints.openai.serving_completion import prompts_of
from pagedllm.outputs import EmbeddingRequestOutput
from pagedllm.pooling.params import PoolingParams
from pagedllm.pooling.pooler import pooling_task
from pagedllm.pooling.score import cosine, pair_prompt, score_pairs


class PoolingServing(OpenAIServing):
    @cached_property
    def task(self) -> str | None:
        """embed, classify, or None for a generative model (fixed for the server's life: computed once)."""
        return pooling_task(self.engine.config)

    @property
    def num_labels(self) -> int | None:
        return getattr(self.engine.config.hf_config, "num_labels", None) if self.task == "classify" else None

    def check_pooling(self, model: str | None, endpoint: str, tasks: tuple[str, ...]) -> None:
        """400 unless the served model's pooling task is one of `tasks` (404 for an unknown model)."""
        if self.check_model(model) is not None:
            raise APIError(f"{endpoint} does not run LoRA adapters: ask for the base model.", 400, param="model")
        if self.task is None:
            raise APIError(f"This model generates text: {endpoint} needs a pooling model (start it with --runner "
                           "pooling).", 400, param="model")
        if self.task not in tasks:
            if self.task == "embed":
                what = "embeds (it has no classification head); it serves /v1/embeddings, /v1/score and /rerank"
            elif self.num_labels == 1:
                what = "classifies (a cross-encoder: one label); it serves /v1/score, /rerank and /classify"
            else:
                what = f"classifies ({self.num_labels} labels); it serves /classify"
            raise APIError(f"{endpoint} is not served here: this model {what}.", 400, param="model")

    async def pool(self, request_id: str, prompts: list[PromptType], params: PoolingParams, arrival_time: float,
                   aliases: dict[str, str] | None = None) -> list[EmbeddingRequestOutput]:
        """One pooling request per prompt, their outputs in prompt order; all or nothing. Whatever is still running
        when this stops early (an engine failure, or the client went away and the task was cancelled) is aborted."""
        stream, ids = await self.submit(request_id, prompts, params, arrival_time, aliases)  # type: ignore[arg-type]
        outputs: dict[str, Any] = {}
        try:
            async for output in stream:
                outputs[output.request_id] = output
        except Exception as error:  # noqa: BLE001 - fails this request only
            raise engine_error(error) from None
        finally:
            self.engine.abort(stream.unfinished)
        if any(not outputs[rid].outputs.embedding for rid in ids):  # an abort (shutdown) leaves no vector
            raise APIError("the request was aborted before its prompts were pooled.", 503, code="aborted")
        return [outputs[rid] for rid in ids]

    # ---- /v1/score and /rerank ------------------------------------------------------------------
    async def score(self, request: ScoreRequest, arrival_time: float) -> Response:
        self.check_pooling(request.model, "/v1/score", ("embed", "classify"))
        try:
            pairs = score_pairs(request.text_1, request.text_2)
        except ValueError as error:
            raise APIError(str(error), 400, param="text_2") from None
        request_id = random_id("score")
        scores, tokens = await self._score(request_id, pairs, request.truncate_prompt_tokens, request.use_activation,
                                           arrival_time)
        data = [ScoreData(index=i, score=score) for i, score in enumerate(scores)]
        return json_response(ScoreResponse(id=request_id, model=self.model_name, data=data,
                                           usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens)))

    async def rerank(self, request: RerankRequest, arrival_time: float) -> Response:
        self.check_pooling(request.model, "/rerank", ("embed", "classify"))
        if not request.documents:
            raise APIError("documents is empty: give at least one document to rank.", 400, param="documents")
        request_id = random_id("rerank")
        pairs = [(request.query, document) for document in request.documents]
        scores, tokens = await self._score(request_id, pairs, request.truncate_prompt_tokens, request.use_activation,
                                           arrival_time)
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep the documents' order
        results = [RerankResult(index=i, relevance_score=scores[i],
                                document=RerankDocument(text=request.documents[i])
                                if request.return_documents else None)
                   for i in ranked[: request.top_n or None]]
        return json_response(RerankResponse(id=request_id, model=self.model_name, results=results,
                                            usage=RerankUsage(total_tokens=tokens)))

    async def _score(self, request_id: str, pairs: list[tuple[str, str]], truncate: int | None,
                     use_activation: bool | None, arrival_time: float) -> tuple[list[float], int]:
        """Each pair's score, and the prompt tokens the engine ran for them (each distinct text once, for an
        embedder)."""
        if self.tokenizer is None:
            raise APIError("scoring texts needs a tokenizer; this server was started with --skip-tokenizer-init.", 400)
        truncate = self._truncation(truncate)
        if self.task == "classify":
            if self.num_labels != 1:
                raise APIError(f"scoring needs a cross-encoder (a classifier with one label); this model has "
                               f"{self.num_labels} labels: use /classify.", 400, param="model")
            prompts: list[PromptType] = [pair_prompt(self.tokenizer, a, b, truncate) for a, b in pairs]
            outputs = await self.pool(request_id, prompts, PoolingParams(use_activation=use_activation), arrival_time)
            return [o.outputs.embedding[0] for o in outputs], sum(len(o.prompt_token_ids) for o in outputs)
        texts = list(dict.fromkeys(text for pair in pairs for text in pair))
        prompts = list(texts) if truncate is None else [
            {"prompt": text, "prompt_token_ids": ids}
            for text, ids in zip(texts, self.tokenizer(texts, truncation=True, max_length=truncate).input_ids)]
        outputs = await self.pool(request_id, prompts, PoolingParams(), arrival_time)
        vectors = {text: output.outputs.embedding for text, output in zip(texts, outputs)}
        return [cosine(vectors[a], vectors[b]) for a, b in pairs], sum(len(o.prompt_token_ids) for o in outputs)

    def _truncation(self, truncate: int | None) -> int | None:
        """truncate_prompt_tokens as a token count: -1 is the context length, and no more than it is allowed."""
        max_len = self.engine.config.max_model_len
        if truncate == -1:
            return max_len
        if truncate is not None and (truncate == 0 or truncate > max_len):
            raise APIError(f"truncate_prompt_tokens must be -1 or in [1, {max_len}] (max_model_len), got {truncate}.",
                           400, param="truncate_prompt_tokens")
        return truncate

    # ---- /classify ----------------------------------------------------------------------------
    async def classify(self, request: ClassificationRequest, arrival_time: float) -> Response:
        self.check_pooling(request.model, "/classify", ("classify",))
        prompts = prompts_of(request.input, "input")
        request_id = random_id("classify")
        outputs = await self.pool(request_id, prompts, PoolingParams(use_activation=request.use_activation),
                                  arrival_time, {"prompt": "input"})
        id2label = getattr(self.engine.config.hf_config, "id2label", None) or {}
        data = []
        for index, output in enumerate(outputs):
            probs = output.outputs.embedding
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append(ClassificationData(index=index, label=str(id2label.get(best, f"LABEL_{best}")), probs=probs,
                                           num_classes=len(probs)))
        tokens = sum(len(o.prompt_token_ids) for o in outputs)
        return json_response(ClassificationResponse(id=request_id, model=self.model_name, data=data,
                                                    usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens)))
