"""The engine's side of constrained decoding: validates constraints when requests are added, compiles their grammars
on worker threads (cached by key), tells the scheduler which waiting requests are ready, fills each step's bitmask
for the constrained rows, and advances every sample's matcher with its tokens.

A request whose grammar is still compiling waits in the queue (the scheduler skips it, keeping its place); it never
holds up a step. A step with no constrained row builds no bitmask at all.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING, Any

from pagedllm.logger import get_logger
from pagedllm.sampling_params import StructuredOutputsParams
from pagedllm.structured_output.backend import GrammarKey, XgrammarBackend, build_grammar, grammar_key
from pagedllm.structured_output.bitmask import GrammarBitmask
from pagedllm.structured_output.request import StructuredOutputRequest, reasoning_ended

if TYPE_CHECKING:
    from pagedllm.core.scheduler import SchedulerOutput
    from pagedllm.engine.request import Request

logger = get_logger(__name__)
_CACHE_SIZE = 512  # compiled grammars kept (a JSON schema's is tens of kB)


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int], max_num_seqs: int,
                 reasoning_parser: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_num_seqs = max_num_seqs
        self._backend: XgrammarBackend | None = None  # built on first use, on a worker (it reads the whole vocabulary)
        self._backend_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._cache: OrderedDict[GrammarKey, Future] = OrderedDict()
        self._waiting: list[Request] = []  # added, grammar not yet ready
        self._bitmask: Any = None  # [max_num_seqs, words] int32, reused by every step
        self.reasoning: tuple[list[int], list[int]] | None = None
        if reasoning_parser is not None:
            from pagedllm.entrypoints.openai.reasoning import get_reasoning_parser

            parser = get_reasoning_parser(reasoning_parser)
            self.reasoning = tuple(tokenizer.encode(t, add_special_tokens=False) for t in (parser.start_token, parser.end_token))
        # Figures for `bench` and the logs: compile seconds per compile, lookups served by the cache.
        self.compile_seconds: list[float] = []
        self.cache_hits = 0

    # ---- adding requests ----------------------------------------------------------------------
    def validate(self, params: StructuredOutputsParams) -> Future:
        """The compiled grammar's future for a constraint; raises ValueError now if the constraint is invalid."""
        if self.tokenizer is None:
            raise ValueError("structured_outputs needs a tokenizer; this engine was started with skip_tokenizer_init=True.")
        key = grammar_key(params)
        future = self._cache.get(key)
        if future is not None and not (future.done() and future.exception() is not None):
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return future
        grammar = build_grammar(params)  # parse only: fast, and the ValueError the caller sees
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pagedllm-grammar")
        future = self._pool.submit(self._compile, grammar)
        self._cache[key] = future
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return future

    def add_request(self, request: Request, future: Future) -> None:
        state = StructuredOutputRequest(future)
        if self.reasoning is not None:
            start, end = self.reasoning
            state.reasoning_end = end
            state.in_reasoning = not reasoning_ended(request.prompt_token_ids, start, end)
        request.structured_output = state
        if not self._make_ready(request):
            self._waiting.append(request)

    def _compile(self, grammar: Any) -> Any:
        start = time.perf_counter()
        compiled = self.backend.compile(grammar)
        self.compile_seconds.append(time.perf_counter() - start)
        return compiled

    @property
    def backend(self) -> XgrammarBackend:
        with self._backend_lock:
            if self._backend is None:
                self._backend = XgrammarBackend(self.tokenizer, self.vocab_size, self.stop_token_ids)
            return self._backend

    # ---- readiness --------------------------------------------------------------------------
    def _make_ready(self, request: Request) -> bool:
        state = request.structured_output
        assert state is not None
        if not state.future.done():
            return False
        error = state.future.exception()
        if error is not None:
            state.error = error
        else:
            state.matcher = self.backend.matcher(state.future.result())
            state.ready = True
        return True

    def update(self) -> list[Request]:
        """Readies the waiting requests whose grammar has compiled; returns those whose compile failed."""
        if not self._waiting:
            return []
        failed, still = [], []
        for request in self._waiting:
            if request.status.finished:
                continue
            if not self._make_ready(request):
                still.append(request)
            elif not request.structured_output.ready:  # type: ignore[union-attr]
                failed.append(request)
        self._waiting = still
        return failed

    def wait(self, timeout: float) -> None:
        """Blocks until a waiting grammar is compiled (or `timeout`): the engine has nothing else to run."""
        futures = [r.structured_output.future for r in self._waiting if r.structured_output is not None]
        if futures:
            wait_futures(futures, timeout, return_when="FIRST_COMPLETED")

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ---- one step -----------------------------------------------------------------------------
    def grammar_bitmask(self, sched: SchedulerOutput) -> GrammarBitmask | None:
        """The bitmask of a step's constrained sampled rows, in sample-row order; None if it has none."""
        rows: list[int] = []
        row = 0
        bitmask = None
        for request, num_new in sched.scheduled:
            # As build_batch: a request samples when this step reaches the end of its tokens, once per position it
            # verifies when it has drafts.
            drafts = len(request.spec_token_ids)
            if request.num_computed_tokens + num_new != request.num_tokens + drafts:
                continue
            state = request.structured_output
            if state is not None and state.active:
                if bitmask is None:
                    bitmask = self._bitmask_buffer(sum(1 + len(r.spec_token_ids) for r, _ in sched.scheduled))
                # a row per verified position: the matcher's state after the drafts before it (all allowed:
                # spec_decode keeps only the drafts the grammar accepts), then back
                for j in range(drafts + 1):
                    state.matcher.fill_next_token_bitmask(bitmask, row + j)
                    rows.append(row + j)
                    if j < drafts:
                        state.matcher.accept_token(request.spec_token_ids[j])
                state.rollback(drafts)
            row += 1 + drafts
        if bitmask is None:
            return None
        return GrammarBitmask(bitmask[:row], rows, self.vocab_size)

    def _bitmask_buffer(self, rows: int) -> Any:
        if self._bitmask is None or self._bitmask.shape[0] < rows:
            self._bitmask = self.backend.allocate_bitmask(max(rows, self.max_num_seqs))
        return self._bitmask

    def accept(self, request: Request, token: int) -> bool:
        """Advances the request's matcher with its new token; True when the request must stop (the grammar has
        terminated, or rejected the token, which only a masked-out draw could cause)."""
        state = request.structured_output
        assert state is not None
        if not state.accept(token, request.output_token_ids):
            logger.warning("request %s: token %d is outside its grammar; stopping it", request.request_id, token)
            return True
        return state.terminated

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
