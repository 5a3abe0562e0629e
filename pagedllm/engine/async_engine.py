"""AsyncLLM: the asyncio front of an engine core (`core.py`) that runs in a process of its own, for the server.

The front owns what is per client: validation of the request's shape, tokenization, the per-request streams,
the bound on work in flight. It sends each request to the core and reads the core's messages on the event loop
as they arrive (one per step), handing each step's outputs to their streams at once. The core owns the
engine: scheduling, the model, sampling, stop checks and detokenization.

Validation: `add_request` awaits the core's verdict on the request (the engine's own `add_request`), so the
caller sees the engine's ValueError (naming the field) before anything is streamed, with one source of truth
for what is valid. The verdict comes before the step the request joins, so it costs no latency.

Outputs are always DELTA: each RequestOutput carries only what is new, and callers accumulate.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

from pagedllm.config import EngineConfig
from pagedllm.engine.core import WireOutput, from_wire
from pagedllm.multimodal.processor import prepare_prompt
from pagedllm.engine.core_client import EngineCoreClient
from pagedllm.engine.llm_engine import EngineStats, LLMEngine, PromptType, load_tokenizer
from pagedllm.pooling.params import PoolingParams
from pagedllm.beam_search import BeamSearch, BeamSearchOutput
from pagedllm.outputs import LogprobsDict, RequestOutput
from pagedllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

# Called on the event loop after every step of the core: (stats, the step's outputs, when the step ended).
StepHook = Callable[[EngineStats, list[RequestOutput], float], None]


class EngineDeadError(RuntimeError):
    """The engine has stopped (its core died, an exception in `step`, or shutdown): no request can be served."""


class EngineOverloadedError(RuntimeError):
    """Admitting the request would exceed the bound on queued work."""


class RequestStream:
    """The outputs of one or more engine requests (e.g. the prompts of one API call), in arrival order.

    Iteration ends once every request in it has finished; an engine failure is raised from it.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.unfinished: set[str] = set()

    def _put(self, output: RequestOutput) -> None:
        self._queue.put_nowait(output)
        if output.finished:
            self.unfinished.discard(output.request_id)

    def _fail(self, error: BaseException) -> None:
        self.unfinished.clear()
        self._queue.put_nowait(error)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._queue.empty() and not self.unfinished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class AsyncLLM:
    def __init__(self, core: EngineCoreClient, max_queued_samples: int | None = None, on_step: StepHook | None = None) -> None:
        """Takes a core that is ready (`EngineCoreClient.wait_ready`); `create` starts one."""
        self.core = core
        self.tokenizer = core.tokenizer
        self.config = core.config
        self.vocab_size = core.vocab_size
        # Bound on samples in flight (running + waiting + being added); None: unbounded.
        self.max_queued_samples = max_queued_samples
        self.on_step = on_step
        assert core.initial_stats is not None
        self.stats = core.initial_stats  # the core's latest, from its last step
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._streams: dict[str, RequestStream] = {}
        self._prompts: dict[str, tuple[str | None, list[int]]] = {}  # request_id -> (prompt text, prompt ids)
        self._pending: dict[str, asyncio.Future[None]] = {}  # adds awaiting the core's verdict
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._samples: dict[str, int] = {}  # request_id -> n, for every request in flight
        self.num_samples_in_flight = 0

    @classmethod
    def create(cls, config: EngineConfig, max_queued_samples: int | None = None, on_step: StepHook | None = None,
               engine_cls: type[LLMEngine] = LLMEngine) -> AsyncLLM:
        """Starts an engine core for `config` and waits until it has loaded."""
        config.finalize()
        tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config)
        core = EngineCoreClient(config, 0, tokenizer, engine_cls=engine_cls)
        core.wait_ready()
        return cls(core, max_queued_samples, on_step)

    @classmethod
    def from_kwargs(cls, max_queued_samples: int | None = None, on_step: StepHook | None = None, **kwargs: Any) -> AsyncLLM:
        return cls.create(EngineConfig.from_kwargs(**kwargs), max_queued_samples, on_step)

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Starts reading the core's messages; call from inside the event loop that will consume the outputs."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.core.attach(self._loop, self._on_message)
        self.core.on_failure(self._core_failed)

    def _core_failed(self, error: BaseException) -> None:
        """The core process has exited (called on its watchdog thread): fail every request and report unhealthy."""
        self.error = error
        self._call(self._fail_all, EngineDeadError(f"the engine failed: {error}"))

    @property
    def is_running(self) -> bool:
        return self._loop is not None and not self._stopping and self.error is None and self.core.alive

    async def shutdown(self) -> None:
        """Stops the core; requests still in flight fail with EngineDeadError."""
        self._stopping = True
        self.core.detach()
        await asyncio.to_thread(self.core.shutdown)
        self._fail_all(EngineDeadError("the engine has shut down"))

    # ---- requests -------------------------------------------------------------------------
    async def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams,
        arrival_time: float | None = None, stream: RequestStream | None = None, lora_request: Any = None,
        priority: int = 0,
    ) -> RequestStream:
        """Queues a request and returns the stream its outputs go to (pass `stream` to share one); lora_request: the
        LoRARequest it runs with; priority: lower runs first (--scheduling-policy priority).

        Raises the engine's ValueError for invalid input, EngineOverloadedError when over capacity, and
        EngineDeadError once the engine has stopped.
        """
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running ({self.error!r})" if self.error else "the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use.")
        samples = 1 if isinstance(params, PoolingParams) else params.n
        if self.max_queued_samples is not None and self.num_samples_in_flight + samples > self.max_queued_samples:
            raise EngineOverloadedError(
                f"the server is at capacity ({self.num_samples_in_flight} sequences in flight, limit {self.max_queued_samples}); retry later."
            )
        assert self._loop is not None
        text, token_ids = self.core.tokenize_prompt(prompt)  # here, not on the core's step loop
        tokenized: dict[str, Any] = {**prompt, "prompt": text, "prompt_token_ids": token_ids} if isinstance(prompt, dict) \
            else {"prompt": text, "prompt_token_ids": token_ids}
        if tokenized.get("multi_modal_data"):  # images processed here too, off the event loop
            token_ids, tokenized["mm_inputs"] = await asyncio.to_thread(prepare_prompt, self.config, prompt, token_ids)
            tokenized["prompt_token_ids"] = token_ids
            del tokenized["multi_modal_data"]
        if not isinstance(params, PoolingParams):  # a pooling request's one output is final anyway
            params = params.clone()
            params.output_kind = RequestOutputKind.DELTA
        stream = stream if stream is not None else RequestStream()
        future: asyncio.Future[None] = self._loop.create_future()
        self.core.send("add", request_id, tokenized, params, arrival_time or time.time(), lora_request, priority)
        # Registered before the core can answer: its messages are read on this loop, later.
        stream.unfinished.add(request_id)
        self._streams[request_id] = stream
        self._prompts[request_id] = (text, token_ids)
        self._pending[request_id] = future
        self._samples[request_id] = samples
        self.num_samples_in_flight += samples
        try:
            await future
        except asyncio.CancelledError:
            self.abort(request_id)  # sent after the add, so the core drops it right after adding it
            raise
        return stream

    async def generate(
        self, request_id: str, prompt: PromptType, params: SamplingParams, arrival_time: float | None = None,
        lora_request: Any = None,
    ) -> AsyncIterator[RequestOutput]:
        """One request's DELTA outputs; closing or cancelling the iterator aborts the request."""
        stream = await self.add_request(request_id, prompt, params, arrival_time, lora_request=lora_request)
        try:
            async for output in stream:
                yield output
        finally:
            self.abort(stream.unfinished)

    async def beam_search(self, prompts: Sequence[PromptType], params: BeamSearchParams, request_id: str) -> list[BeamSearchOutput]:
        """`LLM.beam_search` on this engine: each step's beams run as one batch of requests `{request_id}-{step}-{i}`."""
        search = BeamSearch.for_engine(self.core, prompts, params)  # type: ignore[arg-type]  # what it reads, the core has
        while not search.done:
            batch_id = f"{request_id}-{search.num_steps}"
            search.advance(await self._next_logprobs(batch_id, search.step_prompts(), search.step_params))
        return search.outputs(self.tokenizer)

    async def _next_logprobs(self, batch_id: str, prompts: list[PromptType], params: SamplingParams) -> list[LogprobsDict]:
        """Runs one-token requests together; returns each one's logprobs, in order. All or nothing."""
        stream = RequestStream()
        ids = [f"{batch_id}-{i}" for i in range(len(prompts))]
        logprobs: dict[str, LogprobsDict] = {}
        try:
            adds = (self.add_request(rid, prompt, params, stream=stream) for rid, prompt in zip(ids, prompts))
            added = await asyncio.gather(*adds, return_exceptions=True)
            errors = [result for result in added if isinstance(result, BaseException)]
            if errors:
                raise errors[0]
            async for output in stream:
                if output.outputs and output.outputs[0].logprobs:
                    logprobs[output.request_id] = output.outputs[0].logprobs[0]
        finally:
            self.abort(stream.unfinished)
        missing = [rid for rid in ids if rid not in logprobs]
        if missing:
            raise RuntimeError(f"beam search request {missing[0]} was aborted")
        return [logprobs[rid] for rid in ids]

    def abort(self, request_ids: str | Iterable[str]) -> None:
        """Stops requests; each one's stream then gets a final output with finish_reason 'abort'."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        if ids and self.is_running:
            self.core.send("abort", ids)

    def abort_all(self) -> None:
        self.abort(list(self._streams))

    def has_request(self, request_id: str) -> bool:
        """Whether `request_id` is in flight here (added, not yet finished)."""
        return request_id in self._streams

    async def reset_prefix_cache(self) -> bool:
        return await self.call_engine(LLMEngine.reset_prefix_cache)

    async def add_lora(self, lora_request: Any) -> bool:
        return await self.call_engine(LLMEngine.add_lora, lora_request)

    async def remove_lora(self, lora_int_id: int) -> bool:
        return await self.call_engine(LLMEngine.remove_lora, lora_int_id)

    async def call_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(engine, *args)` in the core, between two steps (fn and its result must pickle)."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        assert self._loop is not None
        call_id = next(self._call_ids)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._calls[call_id] = future
        self.core.send("call", call_id, fn, args)
        return await future

    # ---- the core's messages, on the event loop ----------------------------------------------
    def _on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "step":
            _, wire_outputs, self.stats, now = message
            self._dispatch(wire_outputs, now)
        elif kind == "added":
            for request_id, error in message[1]:
                self._added(request_id, error)
        elif kind == "result":
            _, call_id, error, value = message
            future = self._calls.pop(call_id, None)
            if future is not None:
                _settle(future, value, error)
        else:
            assert kind == "dead", kind
            self.error = message[1]
            self._fail_all(EngineDeadError(f"the engine loop died: {message[1]!r}"))

    def _added(self, request_id: str, error: BaseException | None) -> None:
        future = self._pending.pop(request_id, None)
        if error is not None:
            self._forget(request_id)
            self._streams.pop(request_id, None)
        if future is not None:
            _settle(future, None, error)

    def _dispatch(self, wire_outputs: list[WireOutput], now: float) -> None:
        outputs = []
        for wire in wire_outputs:
            request_id = wire[0]
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            output = from_wire(wire, *self._prompts[request_id])
            if output.finished:
                del self._streams[request_id]
                self._forget(request_id)
            stream._put(output)
            outputs.append(output)
        if self.on_step is not None:
            try:
                self.on_step(self.stats, outputs, now)
            except Exception:  # noqa: BLE001 - metrics must never take the engine down
                logger.exception("on_step hook failed")

    def _forget(self, request_id: str) -> None:
        self._prompts.pop(request_id, None)
        self.num_samples_in_flight -= self._samples.pop(request_id, 0)

    def _fail_all(self, error: BaseException) -> None:
        for future in [*self._pending.values(), *self._calls.values()]:
            if not future.done():
                future.set_exception(error)
        for stream in set(self._streams.values()):
            stream._fail(error)
        self._pending.clear()
        self._calls.clear()
        self._streams.clear()
        self._prompts.clear()
        self._samples.clear()
        self.num_samples_in_flight = 0

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop has closed: nobody is left to tell
            pass


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
