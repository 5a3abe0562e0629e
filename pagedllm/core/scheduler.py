"""Continuous batching under a token budget.

Every step: first the running requests, oldest first (a decode costs one token, an unfinished
prompt costs its next chunk), then waiting requests in arrival order while the budget,
`max_num_seqs` and the KV pool allow; a waiting request starts past the blocks the prefix cache
already holds for it. When the pool runs dry, the most recently admitted running
request is preempted: its blocks are freed and it goes back to the head of the queue, to be
recomputed (prompt + what it generated so far) when there is room again.

Under the priority policy (queues.py) waiting and running requests are ordered by priority first (lower runs first),
so the budget goes to better priorities and the pool's victims are the worst; before each step, running requests of a
worse priority than the best waiting one are preempted while it could not start otherwise. Equal priorities behave
exactly as fcfs.

A request with draft tokens (speculative decoding) is scheduled for its last token and the drafts, as one chunk.

With async scheduling a request's `num_tokens` counts the token its in-flight step will sample, so
it is scheduled as a decode before that token is known; a request whose in-flight token is its last
is left out. With `disjoint_steps` (pipeline parallelism, several micro-batches in flight) a request
with a token in flight is left out altogether, so each step holds other requests.
"""

from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from pagedllm.core.kv_cache import KVCacheManager
from pagedllm.core.queues import WaitingQueue, waiting_queue
from pagedllm.kv_transfer.host_tier import BlockCopies
from pagedllm.multimodal.encoder_cache import EncoderCachePlanner, EncoderWork
from pagedllm.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    # Requests to run this step and how many of their tokens, in batch order: the one-token
    # steps (decodes) first, then prompt chunks.
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    grammar_bitmask: Any = None  # GrammarBitmask of the constrained sampled rows, set by the engine; None: none
    kv_copies: BlockCopies | None = None  # host-tier loads before the forward, saves after it (kv_transfer/)
    encoder_work: EncoderWork | None = None  # images to encode before the forward, cache entries to drop
    has_mm: bool = False  # a scheduled request has images (its positions / embeddings need the multimodal path)
    builtin_processors: bool | None = None  # some unfinished request wants allowed_token_ids / bad words (engine)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(
        self, kv_cache: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, enable_chunked_prefill: bool,
        disjoint_steps: bool = False, max_loras: int = 0, policy: str = "fcfs",
        encoder: EncoderCachePlanner | None = None,
    ) -> None:
        """max_loras: the most LoRA adapters one step may hold (0: LoRA off); policy: fcfs | priority (queues.py);
        encoder: a vision-language model's encoder cache bookkeeping (multimodal/encoder_cache.py)."""
        self.kv_cache = kv_cache
        self.encoder = encoder
        self.priority = policy == "priority"
        self._admissions = itertools.count()
        self.max_loras = max_loras
        self.disjoint_steps = disjoint_steps
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: WaitingQueue = waiting_queue(policy)
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.priority and self.waiting and self.running:
            self._preempt_for_priority(out)
        starved = False  # a running request had to be preempted for room: admit no one this step
        budget = self.max_num_batched_tokens
        decodes: list[tuple[Request, int]] = []  # one-token steps go first in the batch
        chunks: list[tuple[Request, int]] = []
        running, tables, block_size = self.running, self.kv_cache.block_tables, self.kv_cache.block_size
        hashed = self.kv_cache.num_hashed if self.kv_cache.enable_prefix_caching else None
        windowed = self.kv_cache.sliding_window is not None
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            pending = request.num_pending
            if pending and (self.disjoint_steps or len(request.output_token_ids) + pending >= request.max_tokens):
                i += 1  # in another micro-batch, or its token in flight is its last (it finishes when that step is processed)
                continue
            computed = request.num_computed_tokens
            if windowed and computed:
                self.kv_cache.release_outside_window(request.request_id, computed)
            known = len(request.all_token_ids) + pending - computed
            if known <= 0:  # a pooling request whose prompt is all computed: it finishes when its step is processed
                i += 1
                continue
            num_new = min(known + len(request.spec_token_ids), budget)
            if request.spec_token_ids and num_new < known + len(request.spec_token_ids):
                request.spec_token_ids = request.spec_token_ids[: max(0, num_new - known)]  # drafts the budget allows
            if request.mm is not None:
                num_new = self._fit_images(request, computed, num_new, out)
                if not num_new:
                    i += 1
                    continue
            table = tables.get(request.request_id)
            fits = table is not None and len(table) * block_size >= computed + num_new  # most steps need no new block
            preempted = len(out.preempted)
            if fits or self._allocate_or_preempt(request, num_new, out):
                if hashed is not None and (computed + num_new) // block_size > hashed[request.request_id]:
                    self.kv_cache.cache_full_blocks(request, computed + num_new)  # a block is full (if its ids are known)
                (decodes if num_new == 1 else chunks).append((request, num_new))
                budget -= num_new
                i += 1
            # else: `request` itself was preempted (it was the newest), and the loop ends.
            starved = starved or len(out.preempted) > preempted
        skipped: list[Request] = []  # grammars still compiling, KV pulls, adapters over max_loras: they keep their place
        loras: set[int] = set()
        if self.max_loras:  # the adapters already running (LoRA off: nothing to walk)
            loras = {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not starved:
            request = self.waiting[0]
            if (request.structured_output is not None and not request.structured_output.ready) or request.kv_transfer_pending:
                skipped.append(self.waiting.popleft())
                continue
            lora = request.lora_request
            if lora is not None and lora.lora_int_id not in loras:
                if len(loras) >= self.max_loras:
                    skipped.append(self.waiting.popleft())
                    continue
                loras.add(lora.lora_int_id)
            if request.num_pending:  # preempted with a token in flight: wait until it lands
                break
            cached = self.kv_cache.find_cached_blocks(request)  # it holds no blocks: computed == 0
            num_cached = len(cached) * block_size
            num_new = request.num_tokens - num_cached
            if num_new > budget and not self.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if request.mm is not None:
                num_new = self._fit_images(request, num_cached, num_new, out)
                if not num_new or (num_new < request.num_tokens - num_cached and not self.enable_chunked_prefill):
                    break
            if not self.kv_cache.allocate_slots(request.request_id, num_cached + num_new, cached):
                break
            self.kv_cache.record_lookup(request.num_tokens, num_cached)
            self.kv_cache.cache_full_blocks(request, num_cached + num_new)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_cached
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.time()
            if self.priority:  # by (priority, admission): the newest of the worst priority is last
                request.queue_key = (request.priority, next(self._admissions))
                bisect.insort(self.running, request, key=lambda r: r.queue_key)
            else:
                self.running.append(request)
            (decodes if num_new == 1 else chunks).append((request, num_new))
            budget -= num_new
        if skipped:
            self.waiting.extendleft(reversed(skipped))
        out.scheduled = decodes + chunks
        if out.scheduled:  # an empty step launches nothing: its copies (and encoder work) wait for the next one
            out.kv_copies = self.kv_cache.take_copies()
            if self.encoder is not None:
                out.encoder_work = self.encoder.take_work()
        elif self.encoder is not None:
            self.encoder.end_step()
        return out

    def _fit_images(self, request: Request, start: int, num_new: int, out: SchedulerOutput) -> int:
        """The chunk's tokens that may run: cut before an image whose embeddings can't be had this step."""
        out.has_mm = True
        assert self.encoder is not None, "a request with images on an engine without a vision encoder"
        return self.encoder.fit(request.mm, start, num_new)

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        while not self.kv_cache.allocate_slots(request.request_id, request.num_computed_tokens + num_new):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt_for_priority(self, out: SchedulerOutput) -> None:
        """Before anything is scheduled: running requests of a worse priority than the best waiting one make room
        for it (worst and newest first) while it could not start for lack of blocks or of a sequence slot."""
        head = next((r for r in self.waiting if not r.num_pending), None)
        if head is None:
            return
        need = self.kv_cache.blocks_for(head.num_tokens)  # at most: prefix hits would need fewer
        while self.running and self.running[-1].priority > head.priority and (
                need > self.kv_cache.num_free_blocks or len(self.running) >= self.max_num_seqs):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request.request_id)
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """Ends a request (stopped, length, or aborted) wherever it is and frees its blocks."""
        if request.status.finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.kv_cache.free(request.request_id)
