"""What completions and chat share: errors, sampling params from a request, submission to the engine,
logprob formatting, and the SSE response that aborts its requests when the client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from contextlib import suppress
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from pagedllm.engine.async_engine import AsyncLLM, EngineDeadError, EngineOverloadedError, RequestStream
from pagedllm.engine.detokenizer import decode_token
from pagedllm.engine.llm_engine import PromptType
from pagedllm.entrypoints.openai.protocol import PROMPT_FORMS, ErrorInfo, ErrorResponse, SamplingRequest
from pagedllm.kv_transfer.config import KVTransferConfig
from pagedllm.outputs import LogprobsDict
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams

logger = logging.getLogger(__name__)
T = TypeVar("T", bound=BaseModel)
MIN_LOGPROB = -9999.0  # -inf is not JSON; vLLM clamps the same way


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))

    def response(self) -> Response:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return json_response(self.body(), self.status, headers)


def json_response(body: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A pydantic model as JSON, serialized once by pydantic (no dict round trip)."""
    return Response(body.model_dump_json(), status_code=status, headers=headers, media_type="application/json")


def internal_error() -> APIError:
    return APIError("internal server error while processing this request", 500, code="internal_error")


# The engine and SamplingParams start their ValueErrors with the field's name.
_PARAM_RE = re.compile(r"^([a-z_]+)\b")
_PARAM_ALIASES = {"prompt_token_ids": "prompt"}


def value_error(error: ValueError, aliases: dict[str, str] | None = None) -> APIError:
    match = _PARAM_RE.match(str(error))
    named = match.group(1) if match else None
    param = {**_PARAM_ALIASES, **(aliases or {})}.get(named or "", named)
    message = str(error) if param == named else str(error).replace(named, param, 1)  # the field the client sent
    return APIError(message, 400, param=param)


def engine_error(error: BaseException, aliases: dict[str, str] | None = None) -> APIError:
    """Maps what `AsyncLLM.add_request` raised to the answer the client gets."""
    if isinstance(error, ValueError):
        return value_error(error, aliases)
    if isinstance(error, EngineOverloadedError):
        return APIError(str(error), 503, code="overloaded")
    if isinstance(error, EngineDeadError):
        return APIError(str(error), 503, code="engine_dead")
    logger.error("request failed", exc_info=error)
    return internal_error()


# ---- request bodies ---------------------------------------------------------------------------
async def read_json(request: Request, model: type[T], max_bytes: int) -> T:
    """The body as `model`, with a 4xx naming the problem: content type, size, JSON syntax or a field."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise APIError(f"Content-Type must be application/json, got {content_type or 'none'!r}.", 415, code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(f"request body is {declared} bytes; the limit is {max_bytes}.", 413, code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise APIError(f"request body exceeds the limit of {max_bytes} bytes.", 413, code="request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(f"malformed JSON body: {error}", 400, code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object.", 400, code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise validation_error(error) from None


def validation_error(error: ValidationError) -> APIError:
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    param = loc[0] if loc else None
    if param == "prompt" and first["type"] != "missing":  # a union: name the accepted forms, not one member's complaint
        return APIError(f"prompt must be {PROMPT_FORMS}.", 400, param=param)
    where = ".".join(loc) if loc else "body"
    return APIError(f"{where}: {first['msg']}", 400, param=param)


# ---- shared serving -----------------------------------------------------------------------------
class OpenAIServing:
    def __init__(self, engine: AsyncLLM, model_names: list[str], max_n: int) -> None:
        self.engine = engine
        self.model_names = model_names
        self.max_n = max_n
        self.loras: Any = None  # LoRARegistry, when the server serves adapters
        # Read defensively: engines (and test doubles) without a kv_transfer_config field have no connector.
        self.kv_transfer_config = KVTransferConfig.from_user(getattr(getattr(engine, "config", None), "kv_transfer_config", None))

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def check_model(self, model: str | None) -> Any:
        """The LoRARequest of an adapter served under `model`; None for the base model (404 for neither)."""
        if model is None or model in self.model_names:
            return None
        lora = None if self.loras is None else self.loras.get(model)
        if lora is None:
            raise APIError(f"The model `{model}` does not exist.", 404, param="model", code="model_not_found")
        return lora

    def check_request(self, request: SamplingRequest) -> Any:
        """The request's LoRARequest (None: the base model), after its model and n are checked, and that the model
        generates at all (a pooling model's 400 names what it serves, before a chat template fails on an encoder)."""
        lora = self.check_model(request.model)
        if self.engine.config.runner == "pooling":
            raise APIError("This model runs as a pooling model (--runner pooling): it generates nothing; it serves "
                           "/v1/embeddings, /v1/score, /rerank or /classify, as its task allows.", 400, param="model")
        if request.n > self.max_n:
            raise APIError(f"n must be at most {self.max_n}, got {request.n}.", 400, param="n")
        return lora

    def kv_transfer(self, request: SamplingRequest) -> dict[str, Any] | None:
        """What a non-streamed answer carries as `kv_transfer_params`: this producer's address when the request asks
        for a prefill that another engine decodes (`do_remote_decode`, sent by `pagedllm proxy`); else None."""
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_decode"):
            return None
        config = self.kv_transfer_config
        if config is None or not config.produces:
            raise APIError("kv_transfer_params.do_remote_decode needs a prefill instance: start this server with "
                           "--kv-transfer-config '{\"kv_connector\": \"TcpConnector\", \"kv_role\": \"kv_producer\"}' "
                           "(or kv_both; or the IpcConnector).", 400, param="kv_transfer_params")
        if request.stream:
            raise APIError("kv_transfer_params.do_remote_decode needs stream false: the answer tells where the KV is.",
                           400, param="kv_transfer_params")
        return config.producer_params()

    def sampling_params(self, request: SamplingRequest, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None,
                        structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        bias = None
        if request.logit_bias:
            try:
                bias = {int(token): value for token, value in request.logit_bias.items()}
            except ValueError:
                raise APIError("logit_bias keys must be token ids (integers as strings).", 400, param="logit_bias") from None
            if any(not -100 <= value <= 100 for value in bias.values()):
                raise APIError("logit_bias values must be in [-100, 100].", 400, param="logit_bias")
        extra_args = dict(request.vllm_xargs or {})
        if request.kv_transfer_params is not None:
            extra_args["kv_transfer_params"] = request.kv_transfer_params
        try:
            return SamplingParams(
                n=request.n, max_tokens=max_tokens, temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p, top_k=request.top_k or 0,
                min_p=request.min_p or 0.0, seed=request.seed, stop=request.stop, stop_token_ids=request.stop_token_ids,
                presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                repetition_penalty=request.repetition_penalty, logit_bias=bias, ignore_eos=request.ignore_eos,
                min_tokens=request.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                include_stop_str_in_output=request.include_stop_str_in_output,
                skip_special_tokens=request.skip_special_tokens, structured_outputs=structured_outputs,
                allowed_token_ids=request.allowed_token_ids, bad_words=request.bad_words, extra_args=extra_args or None,
            )
        except ValueError as error:
            raise value_error(error) from None

    async def submit(self, request_id: str, prompts: list[PromptType], params: SamplingParams, arrival_time: float,
                     aliases: dict[str, str] | None = None, cache_salt: str | None = None,
                     lora_request: Any = None, priority: int = 0) -> tuple[RequestStream, dict[str, int]]:
        """Adds every prompt as its own engine request, all feeding one stream; all or nothing."""
        stream = RequestStream()
        prompts = with_cache_salt(prompts, cache_salt)
        ids = {f"{request_id}-{i}": i for i in range(len(prompts))}
        adds = [self.engine.add_request(rid, prompt, params, arrival_time, stream, lora_request, priority)
                for rid, prompt in zip(ids, prompts)]
        results = await asyncio.gather(*adds, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.engine.abort(ids)
            raise engine_error(errors[0], aliases)
        return stream, ids

    async def deltas(self, stream: RequestStream, acc: Any) -> AsyncIterator[Any]:
        """The stream's choice deltas (acc turns each engine output into them); an engine failure
        becomes this request's APIError."""
        try:
            async for output in stream:
                for delta in acc.deltas(output):
                    yield delta
        except APIError:
            raise
        except Exception as error:  # noqa: BLE001 - fails this request only
            raise engine_error(error) from None

    async def events(self, stream: RequestStream, acc: Any, chunk: Callable[[list[Any], Any], BaseModel]) -> AsyncIterator[str]:
        """SSE events: one chunk per delta, the usage chunk if asked, an error event if the request
        failed midway, then [DONE]; whatever is left unfinished is aborted (e.g. on disconnect)."""
        try:
            try:
                async for delta in self.deltas(stream, acc):
                    yield sse(chunk([delta], None))
                if acc.request.include_usage:
                    yield sse(chunk([], acc.usage()))
            except APIError as error:  # one failed stream ends with an error event, not a dropped connection
                yield sse(error.body())
            yield SSE_DONE
        finally:
            self.engine.abort(stream.unfinished)


def with_cache_salt(prompts: list[PromptType], cache_salt: str | None) -> list[PromptType]:
    if cache_salt is None:
        return prompts
    return [{"prompt": p, "cache_salt": cache_salt} if isinstance(p, str) else {**p, "cache_salt": cache_salt} for p in prompts]


# ---- logprobs ---------------------------------------------------------------------------------
def token_text(tokenizer: Any, token_id: int, decoded: str | None = None) -> str:
    if decoded is not None:
        return decoded
    if tokenizer is None:
        return f"token_id:{token_id}"
    return decode_token(tokenizer, token_id)


def clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def top_entries(entry: LogprobsDict, limit: int | None = None) -> list[tuple[int, Any]]:
    """(token id, Logprob) by rank; with `limit`, only the top-`limit` (the sampled token may rank below)."""
    ranked = sorted(entry.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30)
    if limit is not None:
        ranked = [(t, lp) for t, lp in ranked if lp.rank is not None and lp.rank <= limit][:limit]
    return ranked


# ---- streaming and disconnects -------------------------------------------------------------------
SSE_DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Runs `work` unless the client disconnects first, in which case it is cancelled (aborting its
    engine requests at once) instead of generating for nobody."""
    work_task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({work_task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not work_task.done():
            work_task.cancel()
            with suppress(asyncio.CancelledError):
                await work_task
    if work_task.cancelled():
        return Response(status_code=499)  # nobody is listening
    return work_task.result()


class SSEResponse(Response):
    """Server-sent events from an async generator, raced against the client's disconnect.

    Starlette only notices a disconnect when a write fails, i.e. at the next token; this stops the
    generator as soon as the connection drops, and always closes it, so its `finally` aborts the requests.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]) -> None:
        # Not Response.__init__: with no body it would send Content-Length: 0.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pump_task = asyncio.ensure_future(pump())
        listener = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({pump_task, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            listener.cancel()
            pump_task.cancel()
            try:
                await pump_task
            except (asyncio.CancelledError, OSError):  # stopped, or the client went away mid-write
                pass
            except Exception:  # noqa: BLE001 - the response has started: nothing left to tell the client
                logger.exception("stream failed")
            finally:
                await self.events.aclose()  # type: ignore[attr-defined]
