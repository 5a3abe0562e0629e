"""POST /v1/completions: prompts as text or token ids, one engine request per prompt, n choices each.

Streaming and non-streaming share one path: every engine output becomes delta choices; a stream sends
them as they come, a plain response merges them. So streamed text always equals non-streamed text.
Beam search (`use_beam_search`) takes its own, non-streaming path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import Response

from pagedllm.engine.async_engine import RequestStream
from pagedllm.engine.llm_engine import PromptType
from pagedllm.entrypoints.openai.protocol import (
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, UsageInfo, random_id,
)
from pagedllm.entrypoints.openai.serving_base import (
    APIError, OpenAIServing, SSEResponse, clamp, engine_error, json_response, token_text, with_cache_salt,
)
from pagedllm.entrypoints.openai.structured import structured_outputs_of
from pagedllm.outputs import LogprobsDict, RequestOutput
from pagedllm.sampling_params import BeamSearchParams


@dataclass
class _ChoiceState:
    started: bool = False  # the echoed prompt has been sent
    text_offset: int = 0


@dataclass
class _Accumulator:
    """Turns engine outputs into delta choices and counts usage."""

    request: CompletionRequest
    prompt_index: dict[str, int]  # engine request id -> prompt position
    tokenizer: Any
    choices: dict[int, _ChoiceState] = field(default_factory=dict)
    prompt_tokens: dict[int, int] = field(default_factory=dict)
    cached_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: int = 0

    def deltas(self, output: RequestOutput) -> list[CompletionChoice]:
        i = self.prompt_index[output.request_id]
        self.prompt_tokens[i] = len(output.prompt_token_ids)
        self.cached_tokens[i] = output.num_cached_tokens
        n = self.request.n
        return [self._delta(i * n + completion.index, output, completion) for completion in output.outputs]

    def _delta(self, index: int, output: RequestOutput, completion: Any) -> CompletionChoice:
        state = self.choices.setdefault(index, _ChoiceState())
        self.completion_tokens += len(completion.token_ids)
        text, logprobs = completion.text, None
        want_logprobs = self.request.logprobs is not None
        if want_logprobs:
            logprobs = CompletionLogprobs()
        if not state.started and self.request.echo:
            prompt_text = output.prompt if output.prompt is not None else self._decode(output.prompt_token_ids)
            if logprobs is not None:
                entries = list(output.prompt_logprobs or [None])
                entries += [None] * (len(output.prompt_token_ids) - len(entries))  # cut short by an abort
                state.text_offset = self._append(logprobs, entries, output.prompt_token_ids, state.text_offset)
            text = prompt_text + text
        state.started = True
        if logprobs is not None and completion.logprobs is not None:
            state.text_offset = self._append(logprobs, completion.logprobs, completion.token_ids, state.text_offset)
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=completion.finish_reason,
                                stop_reason=completion.stop_reason)

    def _append(self, out: CompletionLogprobs, entries: list[LogprobsDict | None], token_ids: list[int], offset: int) -> int:
        for token_id, entry in zip(token_ids, entries):
            chosen = entry.get(token_id) if entry is not None else None
            text = token_text(self.tokenizer, token_id, chosen.decoded_token if chosen is not None else None)
            out.tokens.append(text)
            out.text_offset.append(offset)
            offset += len(text)
            out.token_logprobs.append(clamp(chosen.logprob) if chosen is not None else None)
            out.top_logprobs.append(
                None if entry is None
                else {token_text(self.tokenizer, t, lp.decoded_token): clamp(lp.logprob) for t, lp in entry.items()}
            )
        return offset

    def _decode(self, token_ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(token_ids)

    def usage(self) -> UsageInfo:
        return UsageInfo.of(sum(self.prompt_tokens.values()), self.completion_tokens, sum(self.cached_tokens.values()))


def _merge(into: CompletionChoice, delta: CompletionChoice) -> None:
    into.text += delta.text
    if into.logprobs is not None and delta.logprobs is not None:
        for name in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
            getattr(into.logprobs, name).extend(getattr(delta.logprobs, name))
    if delta.finish_reason is not None:
        into.finish_reason, into.stop_reason = delta.finish_reason, delta.stop_reason


class CompletionServing(OpenAIServing):
    async def create(self, request: CompletionRequest, arrival_time: float) -> Response:
        lora = self.check_request(request)
        served = self.model_name if lora is None else lora.lora_name  # an adapter answers under its name
        prompts = prompts_of(request.prompt)
        if request.use_beam_search:
            return await self._beam_search(request, prompts)
        prompt_logprobs = request.logprobs if request.echo and request.logprobs is not None else None
        constraint, field = structured_outputs_of(request)
        transfer = self.kv_transfer(request)
        params = self.sampling_params(request, request.max_tokens, request.logprobs, prompt_logprobs, constraint)
        request_id = random_id("cmpl")
        stream, ids = await self.submit(request_id, prompts, params, arrival_time, {"structured_outputs": field or "structured_outputs"},
                                        cache_salt=request.cache_salt, lora_request=lora, priority=request.priority)
        acc = _Accumulator(request, ids, self.tokenizer)
        created = int(time.time())
        if request.stream:
            def chunk(choices: list[CompletionChoice], usage: UsageInfo | None) -> CompletionResponse:
                return CompletionResponse(id=request_id, created=created, model=served, choices=choices, usage=usage)

            return SSEResponse(self.events(stream, acc, chunk))
        try:
            choices = await self._collect(stream, acc)
        finally:
            self.engine.abort(stream.unfinished)  # only if something failed midway
        ordered = [choices[i] for i in sorted(choices)]
        return json_response(CompletionResponse(id=request_id, created=created, model=served, choices=ordered, usage=acc.usage(),
                                                kv_transfer_params=transfer))

    async def _beam_search(self, request: CompletionRequest, prompts: list[PromptType]) -> Response:
        """Each prompt's n best beams (of n) as its choices, best first; the sampling fields do not apply."""
        for name in ("stream", "echo", "logprobs"):
            if getattr(request, name) not in (False, None):
                raise APIError(f"{name} is not supported with use_beam_search.", 400, param=name)
        if request.max_tokens is None:
            raise APIError("max_tokens is required with use_beam_search.", 400, param="max_tokens")
        request_id = random_id("cmpl")
        try:
            params = BeamSearchParams(beam_width=request.n, max_tokens=request.max_tokens, ignore_eos=request.ignore_eos,
                                      length_penalty=request.length_penalty,
                                      include_stop_str_in_output=request.include_stop_str_in_output)
            outputs = await self.engine.beam_search(with_cache_salt(prompts, request.cache_salt), params, request_id)
        except Exception as error:  # noqa: BLE001 - fails this request only
            raise engine_error(error) from None
        choices = [
            CompletionChoice(index=i * request.n + j, text=seq.text or "", finish_reason=seq.finish_reason)
            for i, output in enumerate(outputs) for j, seq in enumerate(output.sequences)
        ]
        generated = sum(len(seq.logprobs) for output in outputs for seq in output.sequences)
        prompt = sum(len(seq.tokens) - len(seq.logprobs) for output in outputs for seq in output.sequences[:1])
        usage = UsageInfo(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)
        return json_response(CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage))

    async def _collect(self, stream: RequestStream, acc: _Accumulator) -> dict[int, CompletionChoice]:
        choices: dict[int, CompletionChoice] = {}
        async for delta in self.deltas(stream, acc):
            if delta.index in choices:
                _merge(choices[delta.index], delta)
            else:
                choices[delta.index] = delta
        return choices


def prompts_of(prompt: str | list[str] | list[int] | list[list[int]], param: str = "prompt") -> list[PromptType]:
    """OpenAI's prompt forms (a string, strings, token ids, lists of them) as engine prompts; 400 for an empty one."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    if not items or any(len(p) == 0 for p in items):
        raise APIError(f"{param} is empty: it must hold at least one token.", 400, param=param)
    return [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in items]
