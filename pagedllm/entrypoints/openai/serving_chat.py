"""POST /v1/chat/completions: messages rendered with the model's chat template, then generated like a
completion; `continue_final_message` continues the last (assistant) message instead of opening a new one.

As for completions, streamed and non-streamed answers are built from the same delta choices.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import Response

from pagedllm.engine.async_engine import RequestStream
from pagedllm.entrypoints.llm import render_chat
from pagedllm.entrypoints.openai.protocol import (
    AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs,
    ChatLogprobToken, ChatMessage, ChatStreamChoice, DeltaMessage, TokenizeRequest, TopLogprob, UsageInfo, random_id,
)
from pagedllm.entrypoints.openai.choice_parsers import ChoiceParsers, merge_delta
from pagedllm.entrypoints.openai.reasoning import get_reasoning_parser
from pagedllm.entrypoints.openai.serving_base import (
    APIError, OpenAIServing, SSEResponse, clamp, json_response, token_text, top_entries,
)
from pagedllm.entrypoints.openai.structured import named_tool, structured_outputs_of, tool_choice_mode, tool_constraint
from pagedllm.entrypoints.openai.tool_parsers import get_tool_parser
from pagedllm.outputs import CompletionOutput, LogprobsDict, RequestOutput


def render_messages(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool,
                    continue_final_message: bool, tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The conversation as a token prompt, or a 400 naming what is wrong with it."""
    if tokenizer is None:
        raise APIError("chat needs a tokenizer; this server was started with --skip-tokenizer-init.", 400, param="messages")
    try:
        rendered = [message.for_template() for message in messages]
    except ValueError as error:
        raise APIError(str(error), 400, param="messages") from None
    if not rendered:
        raise APIError("messages is empty: a chat needs at least one message.", 400, param="messages")
    if continue_final_message and rendered[-1].get("role") != "assistant":
        raise APIError("continue_final_message needs the last message to be the assistant's.", 400, param="continue_final_message")
    try:
        return render_chat(tokenizer, rendered, None, add_generation_prompt, continue_final_message, tools,
                           **(template_kwargs or {}))
    except Exception as error:  # noqa: BLE001 - template errors (jinja, a missing role...) are the request's fault
        raise APIError(f"messages could not be rendered with the chat template: {error}", 400, param="messages") from None


def image_urls(messages: list[ChatMessage], limits: dict[str, int] | None, hf_config: Any) -> list[str]:
    """The conversation's image URLs in order; a 400 for a bad part, more images than --limit-mm-per-prompt, or
    images for a text-only model (all before anything is fetched)."""
    from pagedllm.multimodal.policy import check_mm_limits, check_takes_media

    try:
        urls = [url for message in messages for url in message.image_urls()]
        if urls:
            check_takes_media(hf_config, ["image"])
            check_mm_limits({"image": len(urls)}, limits)
    except ValueError as error:
        raise APIError(str(error).replace("multi_modal_data", "messages", 1), 400, param="messages") from None
    return urls


async def load_images(urls: list[str], policy: Any) -> list[Any]:
    """The images, fetched and decoded concurrently; a 400 naming the image that failed."""
    from pagedllm.multimodal.media import MediaError, load_images_async

    try:
        return await load_images_async(urls, policy)
    except MediaError as error:
        raise APIError(f"messages: {error}", 400, param="messages") from None


@dataclass
class _Accumulator:
    request: ChatCompletionRequest
    tokenizer: Any
    parsers: ChoiceParsers | None = None  # reasoning / tool-call parsing; None: content as generated
    started: set[int] = field(default_factory=set)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def deltas(self, output: RequestOutput) -> list[ChatStreamChoice]:
        self.prompt_tokens = len(output.prompt_token_ids)
        self.cached_tokens = output.num_cached_tokens
        return [self._delta(completion) for completion in output.outputs]

    def _delta(self, completion: CompletionOutput) -> ChatStreamChoice:
        self.completion_tokens += len(completion.token_ids)
        role = None if completion.index in self.started else "assistant"  # the first delta of each choice names the role
        self.started.add(completion.index)
        logprobs = None
        if self.request.logprobs:
            logprobs = ChatLogprobs(content=self._logprobs(completion.logprobs or [], completion.token_ids))
        finish_reason = completion.finish_reason
        if self.parsers is None:
            delta = DeltaMessage(role=role, content=completion.text)
        else:
            delta = self.parsers.delta(completion.index, completion.text, finish_reason is not None)
            delta.role = role
            if finish_reason == "stop" and self.parsers.tool_calls_finish(completion.index):
                finish_reason = "tool_calls"
        return ChatStreamChoice(index=completion.index, delta=delta, logprobs=logprobs, finish_reason=finish_reason,
                                stop_reason=completion.stop_reason)

    def _logprobs(self, entries: list[LogprobsDict], token_ids: list[int]) -> list[ChatLogprobToken]:
        out = []
        for token_id, entry in zip(token_ids, entries):
            chosen = entry[token_id]
            text = token_text(self.tokenizer, token_id, chosen.decoded_token)
            top = [
                TopLogprob(token=(t := token_text(self.tokenizer, tid, lp.decoded_token)), logprob=clamp(lp.logprob), bytes=list(t.encode()))
                for tid, lp in top_entries(entry, self.request.top_logprobs or 0)
            ]
            out.append(ChatLogprobToken(token=text, logprob=clamp(chosen.logprob), bytes=list(text.encode()), top_logprobs=top))
        return out

    def usage(self) -> UsageInfo:
        return UsageInfo.of(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


class ChatServing(OpenAIServing):
    def __init__(self, engine: Any, model_names: list[str], max_n: int, enable_auto_tools: bool = False,
                 tool_parser: str | None = None, reasoning_parser: str | None = None) -> None:
        super().__init__(engine, model_names, max_n)
        self.enable_auto_tools = enable_auto_tools
        self.tool_parser = None if tool_parser is None else get_tool_parser(tool_parser)(self.tokenizer)
        self.reasoning_parser = None if reasoning_parser is None else get_reasoning_parser(reasoning_parser)(self.tokenizer)
        from pagedllm.multimodal.policy import MediaPolicy, parse_mm_limits

        config = getattr(engine, "config", None)  # test doubles may have none: no limits, the default policy
        self.mm_limits = parse_mm_limits(getattr(config, "limit_mm_per_prompt", None))
        self.hf_config = getattr(config, "hf_config", None)
        self.media_policy = MediaPolicy.from_config(config)

    async def tokenize_messages(self, request: TokenizeRequest) -> list[int]:
        """/tokenize of messages: the prompt's ids as the engine runs them, each image placeholder expanded to the
        image's tokens (the images loaded and processed as a chat request's are)."""
        urls = image_urls(request.messages or [], self.mm_limits, self.hf_config)
        prompt = render_messages(self.tokenizer, request.messages or [], request.add_generation_prompt,
                                 request.continue_final_message)
        if not urls:
            return prompt["prompt_token_ids"]
        from pagedllm.multimodal.processor import prepare_prompt

        await self._add_images(prompt, urls, request.mm_processor_kwargs)
        try:
            ids, _ = await asyncio.to_thread(prepare_prompt, self.engine.config, prompt, prompt["prompt_token_ids"])
        except ValueError as error:
            raise APIError(f"messages: {error}", 400, param="messages") from None
        return ids

    async def _add_images(self, prompt: dict[str, Any], urls: list[str], settings: dict[str, Any] | None) -> None:
        """The rendered prompt (one placeholder per image) gets its images, loaded, and their processor settings."""
        prompt["multi_modal_data"] = {"image": await load_images(urls, self.media_policy)}
        if settings:
            prompt["mm_processor_kwargs"] = settings

    def _tool_mode(self, request: ChatCompletionRequest) -> str:
        mode = tool_choice_mode(request)
        if mode != "none" and not request.tools:
            raise APIError("tool_choice needs tools: give the functions the model may call.", 400, param="tool_choice")
        if mode == "auto" and (not self.enable_auto_tools or self.tool_parser is None):
            raise APIError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                           400, param="tool_choice")
        return mode

    async def create(self, request: ChatCompletionRequest, arrival_time: float) -> Response:
        lora = self.check_request(request)
        served = self.model_name if lora is None else lora.lora_name  # an adapter answers under its name
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError("top_logprobs needs logprobs=true.", 400, param="top_logprobs")
        mode = self._tool_mode(request)
        constraint, constraint_field = structured_outputs_of(request)
        forced = tool_constraint(request, mode)
        if forced is not None and constraint is not None:
            raise APIError(f"{constraint_field} cannot be combined with tool_choice {mode!r}.", 400, param=constraint_field)
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None
        urls = image_urls(request.messages, self.mm_limits, self.hf_config)
        prompt = render_messages(self.tokenizer, request.messages, request.add_generation_prompt, request.continue_final_message,
                                 tools, request.chat_template_kwargs)
        if urls:  # one placeholder per image in the prompt; the engine expands them (or refuses images)
            await self._add_images(prompt, urls, request.mm_processor_kwargs)
        max_field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        transfer = self.kv_transfer(request)
        params = self.sampling_params(request, max_tokens, logprobs, structured_outputs=forced or constraint)
        request_id = random_id("chatcmpl")
        aliases = {"prompt": "messages", "max_tokens": max_field, "structured_outputs": constraint_field or "tools",
                   "multi_modal_data": "messages", "limit_mm_per_prompt": "messages"}
        stream, _ = await self.submit(request_id, [prompt], params, arrival_time, aliases, request.cache_salt, lora,
                                      request.priority)
        parsers = None
        if self.reasoning_parser is not None or mode != "none":
            named = named_tool(request).function.name if mode == "named" else None
            parsers = ChoiceParsers(self.reasoning_parser, prompt.get("prompt"), mode, self.tool_parser, named)
        acc = _Accumulator(request, self.tokenizer, parsers)
        created = int(time.time())
        if request.stream:
            def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None) -> ChatCompletionChunk:
                return ChatCompletionChunk(id=request_id, created=created, model=served, choices=choices, usage=usage)

            return SSEResponse(self.events(stream, acc, chunk))
        try:
            choices = await self._collect(stream, acc)
        finally:
            self.engine.abort(stream.unfinished)
        ordered = [choices[i] for i in sorted(choices)]
        return json_response(ChatCompletionResponse(id=request_id, created=created, model=served, choices=ordered,
                                                    usage=acc.usage(), kv_transfer_params=transfer))

    async def _collect(self, stream: RequestStream, acc: _Accumulator) -> dict[int, ChatChoice]:
        choices: dict[int, ChatChoice] = {}
        async for delta in self.deltas(stream, acc):
            choice = choices.get(delta.index)
            if choice is None:
                choice = choices[delta.index] = ChatChoice(
                    index=delta.index, message=AssistantMessage(content=""),
                    logprobs=ChatLogprobs(content=[]) if acc.request.logprobs else None,
                )
            merge_delta(choice.message, delta.delta)
            if choice.logprobs is not None and delta.logprobs is not None:
                choice.logprobs.content = (choice.logprobs.content or []) + (delta.logprobs.content or [])
            if delta.finish_reason is not None:
                choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
        if acc.parsers is not None:  # parsed replies say null, not "", where a part is empty (as vLLM)
            for choice in choices.values():
                choice.message.content = choice.message.content or None
        return choices
