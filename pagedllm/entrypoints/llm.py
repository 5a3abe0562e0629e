"""The offline API: `LLM(...).generate(prompts, sampling_params)`, as in vLLM."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any, Sequence

from tqdm.auto import tqdm

from pagedllm.config import EngineConfig
from pagedllm.engine.llm_engine import LLMEngine, PromptType
from pagedllm.lora.request import LoRARequest
from pagedllm.metrics import Metric, ServerMetrics, read_metrics
from pagedllm.beam_search import BeamSearch, BeamSearchOutput
from pagedllm.outputs import (
    ClassificationOutput, ClassificationRequestOutput, EmbeddingRequestOutput, RequestOutput, ScoringOutput,
    ScoringRequestOutput,
)
from pagedllm.pooling.params import PoolingParams
from pagedllm.pooling.pooler import pooling_task
from pagedllm.pooling.score import cosine, pair_prompt, score_pairs
from pagedllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

Conversation = list[dict[str, Any]]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        tokenizer: str | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        kv_cache_memory: int | None = None,
        block_size: int = 16,
        enable_chunked_prefill: bool = True,
        seed: int = 0,
        skip_tokenizer_init: bool = False,
        load_format: str = "auto",
        **kwargs: Any,
    ) -> None:
        config = EngineConfig.from_kwargs(
            model=model, tokenizer=tokenizer, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, kv_cache_memory=kv_cache_memory, block_size=block_size,
            enable_chunked_prefill=enable_chunked_prefill, seed=seed, skip_tokenizer_init=skip_tokenizer_init,
            load_format=load_format, **kwargs,
        )
        self.llm_engine = LLMEngine(config)
        self._ids = itertools.count()
        assert config.max_model_len is not None
        self._metrics = ServerMetrics(config.model or config.model_path or "", config.max_model_len)

    def get_metrics(self) -> list[Metric]:
        """The engine's metrics so far, as vLLM's `LLM.get_metrics()`: Counter, Gauge, Vector and Histogram records
        with the server's `/metrics` names (pagedllm.metrics)."""
        self._metrics.record_step(self.llm_engine.get_stats(), [], time.time())
        return read_metrics(self._metrics.registry)

    def embed(self, prompts: PromptType | Sequence[PromptType], pooling_params: PoolingParams | None = None,
              use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        """Each prompt's vector (`outputs.embedding`), in order, from a model run as a pooling model."""
        self._check_task("embed", "embed")
        return self._pool(prompts, pooling_params, use_tqdm)

    def classify(self, prompts: PromptType | Sequence[PromptType], pooling_params: PoolingParams | None = None,
                 use_tqdm: bool = True) -> list[ClassificationRequestOutput]:
        """Each prompt's label scores (`outputs.probs`: softmax over the labels, sigmoid for one), from a
        classification model (BertForSequenceClassification and the like)."""
        self._check_task("classify", "classify")
        return [ClassificationRequestOutput(o.request_id, ClassificationOutput(o.outputs.embedding), o.prompt_token_ids)
                for o in self._pool(prompts, pooling_params, use_tqdm)]

    def score(self, data_1: str | Sequence[str], data_2: str | Sequence[str], truncate_prompt_tokens: int | None = None,
              use_tqdm: bool = True, pooling_params: PoolingParams | None = None) -> list[ScoringRequestOutput]:
        """The score of each (data_1, data_2) pair (one text against many, or two lists pairwise), as vLLM's: a
        cross-encoder's relevance (sigmoid of its one logit), or an embedding model's cosine similarity."""
        task = pooling_task(self.llm_engine.config)
        pairs = score_pairs(data_1, data_2)
        if task == "classify":
            if self.llm_engine.runner.pooler.num_labels != 1:  # type: ignore[union-attr]
                raise ValueError("score needs a cross-encoder: a classification model with one label.")
            tokenizer = self.get_tokenizer()
            prompts = [pair_prompt(tokenizer, a, b, truncate_prompt_tokens) for a, b in pairs]
            return [ScoringRequestOutput(o.request_id, ScoringOutput(o.outputs.embedding[0]), o.prompt_token_ids)
                    for o in self._pool(prompts, pooling_params, use_tqdm)]
        self._check_task("embed", "score")
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))  # each distinct text embedded once
        vectors = dict(zip(texts, self._pool(texts, pooling_params, use_tqdm)))
        return [ScoringRequestOutput(f"score-{i}", ScoringOutput(cosine(vectors[a].outputs.embedding, vectors[b].outputs.embedding)),
                                     vectors[a].prompt_token_ids + vectors[b].prompt_token_ids)
                for i, (a, b) in enumerate(pairs)]

    def _check_task(self, task: str, call: str) -> None:
        actual = pooling_task(self.llm_engine.config)
        if actual != task:
            what = "a generative model" if actual is None else f"a pooling model that does {actual}"
            raise ValueError(f"{call} needs a pooling model (runner='pooling') that does {task}; this is {what}.")

    def _pool(self, prompts: PromptType | Sequence[PromptType], pooling_params: PoolingParams | None,
              use_tqdm: bool) -> list[EmbeddingRequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        engine, order = self.llm_engine, {}
        texts = [p for p in prompts if isinstance(p, str)]
        if texts and engine.tokenizer is not None:  # one batched call to the tokenizer, not one per text
            ids = iter(engine.tokenizer(texts).input_ids)
            prompts = [{"prompt": p, "prompt_token_ids": next(ids)} if isinstance(p, str) else p for p in prompts]
        try:
            for i, prompt in enumerate(prompts):
                request_id = str(next(self._ids))
                engine.add_request(request_id, prompt, pooling_params or PoolingParams())
                order[request_id] = i
            return self._run(order, use_tqdm)  # type: ignore[return-value]
        except BaseException:
            engine.abort_request(list(order))
            while engine.has_unfinished_requests():
                engine.step()
            raise

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        return self.llm_engine.reset_prefix_cache()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in the order of the prompts. lora_request: one adapter
        for all prompts, or one (or None: the base model) per prompt (enable_lora); priority: one per prompt, lower
        first (scheduling_policy="priority")."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"Got {len(prompts)} prompts but {len(params_list)} sampling_params.")
        engine = self.llm_engine
        order: dict[str, int] = {}
        try:
            loras = list(lora_request) if isinstance(lora_request, Sequence) else [lora_request] * len(prompts)
            if len(loras) != len(prompts):
                raise ValueError(f"Got {len(prompts)} prompts but {len(loras)} lora_requests.")
            priorities = [0] * len(prompts) if priority is None else list(priority)
            if len(priorities) != len(prompts):
                raise ValueError(f"Got {len(prompts)} prompts but {len(priorities)} priorities.")
            for i, (prompt, params, lora, prio) in enumerate(zip(prompts, params_list, loras, priorities)):
                params = params.clone()
                params.output_kind = RequestOutputKind.FINAL_ONLY
                request_id = str(next(self._ids))
                engine.add_request(request_id, prompt, params, lora_request=lora, priority=prio)
                order[request_id] = i
            return self._run(order, use_tqdm)
        except BaseException:
            engine.abort_request(list(order))
            while engine.has_unfinished_requests():  # drain the aborts so the engine is clean
                engine.step()
            raise

    def _run(self, order: dict[str, int], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        results: list[RequestOutput | None] = [None] * len(order)
        bar = tqdm(total=len(order), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        start_tokens = engine.generation_tokens
        with bar:
            while engine.has_unfinished_requests():
                outputs = engine.step()
                now = time.time()
                self._metrics.record_step(engine.get_stats(), [], now)
                for output in outputs:
                    if output.finished and isinstance(output, RequestOutput):
                        self._metrics.record_finished(output, now)
                    if output.finished and output.request_id in order:
                        results[order[output.request_id]] = output
                        bar.update(1)
                if use_tqdm:
                    elapsed = bar.format_dict["elapsed"] or 1e-9
                    bar.set_postfix_str(f"output {(engine.generation_tokens - start_tokens) / elapsed:.1f} tok/s", refresh=False)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def beam_search(
        self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams, use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search over each prompt, as transformers' `generate(num_beams=params.beam_width)`; outputs come
        back in the order of the prompts. Every step runs all running beams as one batch of requests."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        search = BeamSearch.for_engine(self.llm_engine, list(prompts), params)
        with tqdm(total=params.max_tokens, desc="Beam search", dynamic_ncols=True, disable=not use_tqdm) as bar:
            while not search.done:
                outputs = self.generate(search.step_prompts(), search.step_params, use_tqdm=False)
                search.advance([output.outputs[0].logprobs[0] for output in outputs])  # type: ignore[index]
                bar.update(1)
        return search.outputs(self.get_tokenizer())

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Renders each conversation with the model's chat template, then generates. Messages take OpenAI's content
        parts: text, {"type": "image_url", "image_url": {"url": ...}} (a data: or http(s) URL, or file:// inside
        allowed_local_media_path), loaded here (MediaError, a ValueError, for one that cannot be), and vLLM's
        {"type": "image_pil", "image_pil": <PIL image>};
        mm_processor_kwargs: image processor settings for these images, over the engine's."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)  # type: ignore[list-item]
        prompts = [self._chat_prompt(conv, chat_template, add_generation_prompt, continue_final_message)
                   for conv in conversations]
        if mm_processor_kwargs:
            for prompt in prompts:
                if "multi_modal_data" in prompt:
                    prompt["mm_processor_kwargs"] = mm_processor_kwargs
        return self.generate(prompts, sampling_params, use_tqdm)

    def _chat_prompt(self, conversation: Conversation, chat_template: str | None, add_generation_prompt: bool,
                     continue_final_message: bool) -> dict[str, Any]:
        from pagedllm.entrypoints.chat_utils import template_conversation

        messages, urls = template_conversation(conversation, allow_pil=True)
        if urls:  # a text-only model, or too many images, is refused before anything is fetched
            from pagedllm.multimodal.policy import check_mm_limits, check_takes_media, parse_mm_limits

            config = self.llm_engine.config
            check_takes_media(config.hf_config, ["image"])
            check_mm_limits({"image": len(urls)}, parse_mm_limits(config.limit_mm_per_prompt))
        prompt = render_chat(self.get_tokenizer(), messages, chat_template, add_generation_prompt,
                             continue_final_message)
        if urls:  # one placeholder per image in the prompt; the engine expands them
            from pagedllm.multimodal.media import MediaPolicy, load_images

            fetched = iter(load_images([u for u in urls if isinstance(u, str)],
                                       MediaPolicy.from_config(self.llm_engine.config)))
            prompt["multi_modal_data"] = {"image": [next(fetched) if isinstance(u, str) else u for u in urls]}
        return prompt


def render_chat(
    tokenizer: Any, messages: Conversation, chat_template: str | None = None,
    add_generation_prompt: bool = True, continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None, **template_kwargs: Any,
) -> dict[str, Any]:
    """A conversation as a token prompt; the template already holds any BOS, so none is added again. `tools` (OpenAI
    function specs) and `template_kwargs` (e.g. enable_thinking) go to the template as variables."""
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer; this engine was started with skip_tokenizer_init=True.")
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message.")
    if continue_final_message and add_generation_prompt:
        add_generation_prompt = False
    text = tokenizer.apply_chat_template(
        [_template_message(m) for m in messages], chat_template=chat_template, tokenize=False, tools=tools or None,
        add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message, **template_kwargs,
    )
    return {"prompt": text, "prompt_token_ids": tokenizer(text, add_special_tokens=False).input_ids}


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """Assistant tool calls with their arguments as objects, as templates (Llama 3, Qwen) iterate them; OpenAI sends
    them as JSON text."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for call in calls:
        function = dict(call.get("function") or {})
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except ValueError:
                pass  # left as text: the template gets what the client sent
        fixed.append({**call, "function": function})
    return {**message, "tool_calls": fixed}
