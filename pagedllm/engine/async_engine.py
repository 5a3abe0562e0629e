"""AsyncLLM: the synchronous LLMEngine behind an asyncio front, for the server.

The engine is not thread-safe, so exactly one background thread owns it and loops: apply the commands the
event loop queued (add / abort), step, hand the step's outputs back to the event loop in one
`call_soon_threadsafe`. When there is nothing to do it sleeps on a condition (no busy spin). The event loop
never touches the engine: it queues commands and reads per-request streams.

Validation: `add_request` runs the engine's own `add_request` on the engine thread and awaits its result,
so the caller sees the engine's ValueError (naming the field) before anything is streamed, with one source
of truth for what is valid. It costs at most one step of latency, and a request cannot start before the next
step anyway.

Outputs are always DELTA: each RequestOutput carries only what is new, and callers accumulate.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

from pagedllm.engine.llm_engine import EngineStats, LLMEngine, PromptType
from pagedllm.beam_search import BeamSearch, BeamSearchOutput
from pagedllm.outputs import LogprobsDict, RequestOutput
from pagedllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

# Called on the engine thread after every step: (stats, the step's outputs, when the step ended).
StepHook = Callable[[EngineStats, list[RequestOutput], float], None]


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (an exception in `step`, or shutdown): no request can be served."""


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


@dataclass
class _Add:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    arrival_time: float
    future: asyncio.Future[None] = field(repr=False)


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Call:
    """Runs `fn(engine)` on the engine thread, between steps."""

    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future[Any] = field(repr=False)


class AsyncLLM:
    def __init__(self, engine: LLMEngine, max_queued_samples: int | None = None, on_step: StepHook | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.config = engine.config
        self.vocab_size = engine.vocab_size
        # Bound on samples in flight (running + waiting + being added); None: unbounded.
        self.max_queued_samples = max_queued_samples
        self.on_step = on_step
        self.stats = engine.get_stats()  # the engine thread's latest snapshot, for readers on other threads
        self.error: BaseException | None = None
        # Engine-thread side, guarded by _cond.
        self._cond = threading.Condition()
        self._inbox: list[_Add | _Abort | _Call] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Event-loop side.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._samples: dict[str, int] = {}  # request_id -> n, for every request in flight
        self.num_samples_in_flight = 0

    @classmethod
    def from_kwargs(cls, max_queued_samples: int | None = None, on_step: StepHook | None = None, **kwargs: Any) -> AsyncLLM:
        return cls(LLMEngine.from_kwargs(**kwargs), max_queued_samples, on_step)

    # ---- lifecycle (event loop) -----------------------------------------------------------
    def start(self) -> None:
        """Starts the engine thread; call from inside the event loop that will consume the outputs."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
        self._thread.start()
        self.engine.on_failure(self._engine_failed)

    def _engine_failed(self, error: BaseException) -> None:
        """A rank of a parallel engine died (called on its watchdog thread): fail every request and report
        unhealthy now, even if the engine thread is stuck in a collective that will never complete."""
        with self._cond:
            self.error = error
            self._cond.notify()
        self._call(self._fail_all, EngineDeadError(f"the engine failed: {error}"))

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    async def shutdown(self) -> None:
        """Stops the engine thread; requests still in flight fail with EngineDeadError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._fail_all(EngineDeadError("the engine has shut down"))

    # ---- requests (event loop) ------------------------------------------------------------
    async def add_request(
        self, request_id: str, prompt: PromptType, params: SamplingParams,
        arrival_time: float | None = None, stream: RequestStream | None = None,
    ) -> RequestStream:
        """Queues a request and returns the stream its outputs go to (pass `stream` to share one).

        Raises the engine's ValueError for invalid input, EngineOverloadedError when over capacity, and
        EngineDeadError once the engine loop has stopped.
        """
        if not self.is_running:
            raise EngineDeadError(f"the engine loop is not running ({self.error!r})" if self.error else "the engine loop is not running")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use.")
        if self.max_queued_samples is not None and self.num_samples_in_flight + params.n > self.max_queued_samples:
            raise EngineOverloadedError(
                f"the server is at capacity ({self.num_samples_in_flight} sequences in flight, limit {self.max_queued_samples}); retry later."
            )
        assert self._loop is not None
        params = params.clone()
        params.output_kind = RequestOutputKind.DELTA
        stream = stream if stream is not None else RequestStream()
        future: asyncio.Future[None] = self._loop.create_future()
        self._send(_Add(request_id, prompt, params, arrival_time or time.time(), future))
        # Registered in the same loop callback as the send: the engine thread's replies run on this loop
        # later, so no output can miss its stream.
        stream.unfinished.add(request_id)
        self._streams[request_id] = stream
        self._pending[request_id] = future
        self._samples[request_id] = params.n
        self.num_samples_in_flight += params.n
        try:
            await future
        except asyncio.CancelledError:
            self.abort(request_id)  # queued after the add, so the engine drops it right after adding it
            raise
        return stream

    async def generate(
        self, request_id: str, prompt: PromptType, params: SamplingParams, arrival_time: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """One request's DELTA outputs; closing or cancelling the iterator aborts the request."""
        stream = await self.add_request(request_id, prompt, params, arrival_time)
        try:
            async for output in stream:
                yield output
        finally:
            self.abort(stream.unfinished)

    async def beam_search(self, prompts: Sequence[PromptType], params: BeamSearchParams, request_id: str) -> list[BeamSearchOutput]:
        """`LLM.beam_search` on this engine: each step's beams run as one batch of requests `{request_id}-{step}-{i}`."""
        search = BeamSearch.for_engine(self.engine, prompts, params)  # reads only what never changes after start
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
            self._send(_Abort(ids))

    def abort_all(self) -> None:
        self.abort(list(self._streams))

    def has_request(self, request_id: str) -> bool:
        """Whether `request_id` is in flight here (added, not yet finished)."""
        return request_id in self._streams

    async def reset_prefix_cache(self) -> bool:
        return await self._call_engine(lambda engine: engine.reset_prefix_cache())

    async def _call_engine(self, fn: Callable[[LLMEngine], Any]) -> Any:
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._send(_Call(fn, future))
        return await future

    def _send(self, command: _Add | _Abort | _Call) -> None:
        with self._cond:
            if self.error is not None or self._stopping:
                raise EngineDeadError("the engine loop is not running")
            self._inbox.append(command)
            self._cond.notify()

    # ---- event-loop callbacks from the engine thread -----------------------------------------
    def _added(self, command: _Add, error: BaseException | None) -> None:
        self._pending.pop(command.request_id, None)
        if error is not None:
            self._forget(command.request_id)
            self._streams.pop(command.request_id, None)
        _settle(command.future, None, error)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
                self._forget(output.request_id)
            stream._put(output)

    def _forget(self, request_id: str) -> None:
        self.num_samples_in_flight -= self._samples.pop(request_id, 0)

    def _fail_all(self, error: BaseException) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        for stream in set(self._streams.values()):
            stream._fail(error)
        self._pending.clear()
        self._streams.clear()
        self._samples.clear()
        self.num_samples_in_flight = 0

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop has closed: nobody is left to tell
            pass

    # ---- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cond:
                    while not self._inbox and not engine.has_unfinished_requests() and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        return
                    commands, self._inbox = self._inbox, []
                for command in commands:
                    self._apply(command)
                if not engine.has_unfinished_requests():
                    continue
                outputs = engine.step()
                now = time.time()
                self.stats = engine.get_stats()
                if outputs:
                    self._call(self._dispatch, outputs)
                self._record(outputs, now)
        except BaseException as exc:  # noqa: BLE001 - whatever killed the loop is reported to every request
            logger.exception("The engine loop died")
            with self._cond:
                self.error = exc
            self._call(self._fail_all, EngineDeadError(f"the engine loop died: {exc!r}"))

    def _apply(self, command: _Add | _Abort | _Call) -> None:
        if isinstance(command, _Abort):
            self.engine.abort_request(command.request_ids)
            return
        if isinstance(command, _Call):
            try:
                result = command.fn(self.engine)
            except Exception as exc:  # noqa: BLE001 - the caller gets it
                self._call(_settle, command.future, None, exc)
            else:
                self._call(_settle, command.future, result, None)
            return
        error: BaseException | None = None
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params, command.arrival_time)
        except Exception as exc:  # noqa: BLE001 - fails this request only (ValueError: its input is invalid)
            error = exc
        self._call(self._added, command, error)

    def _record(self, outputs: list[RequestOutput], now: float) -> None:
        if self.on_step is None:
            return
        try:
            self.on_step(self.stats, outputs, now)
        except Exception:  # noqa: BLE001 - metrics must never take the engine down
            logger.exception("on_step hook failed")


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
