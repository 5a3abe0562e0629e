"""The engine: requests in, one scheduled batch per `step`, outputs out.

Synchronous and self-contained (no event loop, no threads), so the offline `LLM` drives it in a
loop and the server runs it in an engine-core process (`core.py`) behind an async front.

Async scheduling (on by default on CUDA): `step` schedules and launches step N+1 before it
processes step N's tokens, so the CPU work of both (scheduling, batch building, stop checks,
detokenization) overlaps the device's run of N+1. At most one step is in flight. A request that
gets a token from step N is scheduled in N+1 as a decode whose input id the runner takes from N's
sampled ids on the device (`Request.num_pending` counts that token meanwhile). If the request
finishes (or is aborted) when N is processed, its N+1 token is dropped; its blocks are freed at
once, which is safe because any new owner writes them in a later step, stream-ordered after N+1.
Outputs therefore come one `step` call later than in synchronous mode, with the same tokens.
Batches that hold a request with penalties (which read the output history) run synchronously.

Tensor/pipeline parallelism: the engine starts ranks 1..N-1 (`executor/`) and hosts the driver
rank's runner itself, so scheduling, async scheduling and sampling work as with one process. Under
pipeline parallelism with async scheduling, up to `pipeline_parallel_size` steps (micro-batches) stay
in flight, so that every stage has one to run: each step schedules only requests with no token in
flight (no request is in two micro-batches), and a step's tokens are processed once that many later
steps have been launched.
`shutdown()` stops those ranks; a rank that dies fails the next step, and `on_failure` callbacks
hear of it at once.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache import KVCacheManager
from pagedllm.kv_transfer.connector import KVConnector, make_connector
from pagedllm.logits_process import validate_params
from pagedllm.logits_process.state import wants_builtin
from pagedllm.multimodal.encoder_cache import EncoderCachePlanner, encoder_cache_rows
from pagedllm.multimodal.processor import prepare_prompt, processor_for
from pagedllm.kv_transfer.host_tier import HostTier
from pagedllm.core.scheduler import Scheduler, SchedulerOutput
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.executor.workers import FailureCallback, Workers, start_workers
from pagedllm.layers.attention import uniform_sliding_window
from pagedllm.logger import get_logger
from pagedllm.outputs import CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from pagedllm.pooling.params import PoolingParams
from pagedllm.pooling.pooler import PoolingState
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.spec_decode.decoder import SpecDecodeStats, make_spec_decoder
from pagedllm.structured_output import StructuredOutputManager
from pagedllm.worker.model_runner import ModelRunner
from pagedllm.worker.step_output import StepHandle

logger = get_logger(__name__)

# A prompt: text, or {"prompt_token_ids": [...]} (optionally with "prompt" text beside it), or
# {"prompt": text}; a dict may carry a "cache_salt": only requests with the same salt share cached blocks.
PromptType = str | dict[str, Any]


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_used_blocks: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    prefix_cache_queries: int  # tokens looked up in the prefix cache
    prefix_cache_hits: int  # tokens found there
    external_prefix_cache_queries: int = 0  # tokens looked up in the host tier or a producer after a GPU miss
    external_prefix_cache_hits: int = 0  # tokens loaded from it
    mm_cache_queries: int = 0  # images looked up in the encoder cache as their prompt chunks were scheduled
    mm_cache_hits: int = 0  # of those, the ones found there (not encoded again)
    spec_decode: SpecDecodeStats | None = None  # with speculative decoding
    running_loras: tuple[str, ...] = ()  # LoRA adapters of running / waiting requests, by name (enable_lora)
    waiting_loras: tuple[str, ...] = ()


@dataclass(eq=False)
class _Group:
    """The n samples of one user request; they finish together from the user's point of view."""

    request_id: str
    children: list[Request]
    output_kind: RequestOutputKind
    emitted: dict[int, tuple[int, int]] = field(default_factory=dict)  # index -> (tokens, logprobs) sent so far
    emitted_final: set[int] = field(default_factory=set)  # indices whose finish has been reported
    num_unfinished: int = 0

    def __post_init__(self) -> None:
        self.num_unfinished = len(self.children)

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        config.finalize()
        if config.data_parallel_size > 1:
            raise ValueError("data_parallel_size > 1 runs engine replicas behind `pagedllm serve`; one LLMEngine is one replica.")
        self.config = config
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config)
        self.eos_token_ids = _eos_token_ids(config, self.tokenizer)
        start = time.perf_counter()
        self.workers: Workers | None = start_workers(config) if config.world_size > 1 else None
        self._shutdown: weakref.finalize | None = None
        try:
            self.runner = ModelRunner(config, None if self.workers is None else self.workers.state)
        except BaseException:
            if self.workers is not None:
                self.workers.shutdown()
            raise
        if self.workers is not None:
            self._shutdown = weakref.finalize(self, _stop_workers, self.runner, self.workers)
        self.vocab_size = self.runner.vocab_size
        host_tier = HostTier(self.runner.num_host_slots) if self.runner.num_host_slots else None
        self.kv_cache = KVCacheManager(self.runner.num_blocks, config.block_size, config.max_blocks_per_seq,
                                       config.enable_prefix_caching, uniform_sliding_window(config.hf_config), host_tier)
        assert config.max_model_len is not None
        logger.info(
            "%s on %s (%s, %s attention%s): KV cache of %d blocks x %d tokens in %s (%.2f GiB), max concurrency at "
            "max_model_len=%d: %.1f requests; ready in %.1f s",
            config.model_path, config.device, config.dtype, self.runner.backend.name,
            (", CUDA graphs" if self.runner.graph_runner else "") + (", async scheduling" if config.async_scheduling else "")
            + (f", TP={config.tensor_parallel_size} PP={config.pipeline_parallel_size}" if self.workers else ""),
            self.runner.num_blocks, config.block_size, str(self.runner.kv_dtype).removeprefix("torch."),
            self.runner.num_blocks * self.runner.kv_bytes_per_block() / 2**30, config.max_model_len,
            self.runner.num_blocks / self.kv_cache.blocks_for(config.max_model_len), time.perf_counter() - start,
        )
        assert config.max_num_batched_tokens is not None
        # A vision-language model: its encoder cache's bookkeeping lives in the scheduler.
        encoder = None
        if self.runner.encodes_images:
            processor_for(config)  # built now: a bad mm_processor_kwargs fails at start
            encoder = EncoderCachePlanner(config.max_num_batched_tokens, encoder_cache_rows(config),
                                          whole_images=self.runner.bidirectional_images)
        self.scheduler = Scheduler(self.kv_cache, config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill,
                                   disjoint_steps=config.pipeline_parallel_size > 1,
                                   max_loras=config.max_loras if config.enable_lora else 0,
                                   policy=config.scheduling_policy, encoder=encoder)
        self.groups: dict[str, _Group] = {}
        self.requests: dict[str, Request] = {}  # every unfinished sample, by its own id
        self._aborted: list[_Group] = []
        self.prompt_tokens = self.generation_tokens = 0
        self._inflight: deque[StepHandle] = deque()  # launched steps whose tokens are not yet processed, oldest first
        self._num_penalized = 0  # unfinished requests with penalties: while any, steps run synchronously
        self._num_builtin = 0  # unfinished requests with allowed_token_ids or bad words (built-in logits processors)
        # Constrained decoding: a matcher must see a row's token before the next step's mask, so such steps run
        # synchronously too (like penalties); steps without constrained rows are untouched.
        self.structured_output = StructuredOutputManager(self.tokenizer, self.vocab_size, self.eos_token_ids,
                                                         config.max_num_seqs, config.reasoning_parser)
        self._num_constrained = 0
        self.spec = None if config.speculative_config is None else make_spec_decoder(config, self.runner, self.kv_cache)
        self.kv_connector: KVConnector | None = make_connector(config.kv_transfer_config, self.kv_cache, self.runner)
        if self.kv_connector is not None:
            weakref.finalize(self, self.kv_connector.close)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> LLMEngine:
        return cls(EngineConfig.from_kwargs(**kwargs))

    # ---- requests in ----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams | None = None,
                    arrival_time: float | None = None, lora_request: Any = None, priority: int = 0) -> None:
        """Queues a request; raises ValueError (naming the field) if it could never run. lora_request: a LoRARequest
        (enable_lora), loaded and checked now. PoolingParams: a pooling request (runner="pooling"), whose output is
        its prompt's vector. priority: lower runs first (scheduling_policy="priority")."""
        if priority != 0 and self.config.scheduling_policy != "priority":
            raise ValueError(f"priority={priority}, but priority scheduling is off: start the engine with "
                             "scheduling_policy='priority' (--scheduling-policy priority).")
        if not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}.")
        pooling = None
        if isinstance(params, PoolingParams) or (params is None and self.config.runner == "pooling"):
            pooling = self._pooling_state(params or PoolingParams())
            params = SamplingParams(max_tokens=1, output_kind=RequestOutputKind.FINAL_ONLY)
        elif self.config.runner == "pooling":
            raise ValueError("this model runs as a pooling model (runner='pooling'): it embeds prompts (LLM.embed, "
                             "/v1/embeddings) and generates nothing.")
        params = params or SamplingParams()
        if pooling is None:
            if self.tokenizer is not None:
                params.update_from_tokenizer(self.tokenizer)  # text bad_words into token sequences
            validate_params(self.config.logits_processors, params)
        if lora_request is not None:
            if self.runner.lora is None:
                raise ValueError("lora_request needs an engine started with enable_lora=True (--enable-lora).")
            self.runner.lora.add(lora_request)
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already in use.")
        text, token_ids = self.tokenize_prompt(prompt)
        token_ids, mm = prepare_prompt(self.config, prompt, token_ids)
        if mm is not None and self.scheduler.encoder is None:
            raise ValueError("multi_modal_data: this model takes no images.")
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if salt is not None and not isinstance(salt, str):
            raise ValueError("cache_salt must be a string.")
        token_types = self._token_type_ids(prompt, token_ids)
        max_tokens = self._validate(token_ids, params, pooling=pooling is not None)
        # Parsed now (an invalid schema is this ValueError); compiled on a worker while the request waits.
        grammar = None if params.structured_outputs is None else self.structured_output.validate(params.structured_outputs)
        children = []
        for i in range(params.n):
            child_params = params if pooling is not None else params.clone()  # a pooling request's are its own
            child_params.n = 1
            if params.seed is not None:
                child_params.seed = params.seed + i
            child_params.all_stop_token_ids = set(params.stop_token_ids or []) | self.eos_token_ids
            child_id = request_id if params.n == 1 else f"{i}_{request_id}"
            request = Request(child_id, text, token_ids, child_params, max_tokens, self._generator(child_params.seed),
                              request_id, i, cache_salt=salt, lora_request=lora_request, pooling=pooling,
                              token_type_ids=token_types, priority=priority, mm=mm)
            if arrival_time is not None:
                request.metrics.arrival_time = arrival_time
            if self.tokenizer is not None and pooling is None:  # a pooling request has no text to detokenize
                from pagedllm.engine.detokenizer import IncrementalDetokenizer

                request.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, child_params)
            children.append(request)
        self.groups[request_id] = _Group(request_id, children, params.output_kind)
        for request in children:
            self.requests[request.request_id] = request
            if self.kv_connector is not None:
                self.kv_connector.on_request(request, params.extra_args)
            self._num_penalized += request.params.needs_penalties
            self._num_builtin += wants_builtin(request.params)
            if grammar is not None:
                self.structured_output.add_request(request, grammar)  # each sample has its own matcher
                self._num_constrained += 1
            self.scheduler.add_request(request)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt", "")
        if not isinstance(prompt, str):
            raise ValueError("prompt must be a string or a dict with 'prompt_token_ids' (or 'prompt').")
        if self.tokenizer is None:
            raise ValueError("This engine was started with skip_tokenizer_init=True: pass {'prompt_token_ids': [...]}.")
        return prompt, self.tokenizer(prompt).input_ids

    def _token_type_ids(self, prompt: PromptType, token_ids: list[int]) -> list[int] | None:
        """A prompt's segment ids (`token_type_ids`, as a tokenizer gives them for a text pair), for an encoder."""
        types = prompt.get("token_type_ids") if isinstance(prompt, dict) else None
        if types is None or not any(types):
            return None
        if not self.config.is_encoder:
            raise ValueError("token_type_ids are for encoder models (BERT-style cross-encoders).")
        vocab = getattr(self.config.hf_config, "type_vocab_size", 1)
        if vocab <= 1:
            return None  # a one-segment model (XLM-R): a tokenizer's segment ids have nothing to select
        if len(types) != len(token_ids) or not all(isinstance(t, int) and 0 <= t < vocab for t in types):
            raise ValueError(f"token_type_ids must hold one id in [0, {vocab}) per prompt token.")
        return list(types)

    def _pooling_state(self, params: PoolingParams) -> PoolingState:
        if self.config.runner != "pooling":
            raise ValueError("pooling requests (embed) need a model run as a pooling model: runner='pooling' "
                             "(--runner pooling).")
        hf = self.config.hf_config
        if params.dimensions is not None:
            if not (getattr(hf, "is_matryoshka", False) or getattr(hf, "matryoshka_dimensions", None)):
                raise ValueError("dimensions: this model does not support Matryoshka truncation.")
            if not 1 <= params.dimensions <= hf.hidden_size:
                raise ValueError(f"dimensions must be in [1, {hf.hidden_size}], got {params.dimensions}.")
        assert self.runner.pooler is not None
        return PoolingState(params, needs_every_row=self.runner.pooler.pooling_type != "LAST")

    def _validate(self, token_ids: list[int], params: SamplingParams, pooling: bool = False) -> int:
        """The request's resolved max_tokens (1 for a pooling request, which fills the context with its prompt)."""
        max_len = self.config.max_model_len
        assert max_len is not None
        if not token_ids:
            raise ValueError("prompt is empty: it must hold at least one token.")
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids hold ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}.")
        if pooling:
            if len(token_ids) > max_len:
                raise ValueError(f"prompt is {len(token_ids)} tokens long, but the model's context (max_model_len) "
                                 f"holds {max_len}.")
            return 1
        params.verify_token_ids(self.vocab_size)
        if len(token_ids) >= max_len:
            raise ValueError(f"prompt is {len(token_ids)} tokens long, but the context (max_model_len) holds {max_len}.")
        max_tokens = params.max_tokens if params.max_tokens is not None else max_len - len(token_ids)
        if len(token_ids) + max_tokens > max_len:
            raise ValueError(
                f"max_tokens={max_tokens} is too large: the prompt has {len(token_ids)} tokens and the context "
                f"(max_model_len) holds {max_len}, so at most {max_len - len(token_ids)} can be generated."
            )
        # One sample must fit the whole pool, or it could never finish.
        needed = self.kv_cache.blocks_for(len(token_ids) + max_tokens)
        if needed > self.kv_cache.num_blocks:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({max_tokens}) needs {needed} KV blocks, but the "
                f"cache holds only {self.kv_cache.num_blocks}: raise kv_cache_memory or lower max_tokens."
            )
        return max_tokens

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.runner.device).manual_seed(seed)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Stops requests now; their blocks are freed, and the next `step` reports them with finish_reason 'abort'."""
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            group = self.groups.get(request_id)
            if group is None:
                continue
            for request in group.children:
                if not request.status.finished:
                    self._finish(request, RequestStatus.FINISHED_ABORTED)
            self._aborted.append(group)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def get_num_unfinished_requests(self) -> int:
        return len(self.groups)

    # ---- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        touched: dict[str, _Group] = {g.request_id: g for g in self._aborted}
        self._aborted = []
        if self._num_constrained:
            self._fail_grammars(touched)
        if self.kv_connector is not None:
            self.kv_connector.collect()  # pulled prompts may be scheduled now
        # Steps overlap unless a step's tokens must be known before the next is built: penalties and grammars read
        # them, and drafts are proposed from them.
        overlap = (bool(self.config.async_scheduling) and not self._num_penalized and not self._num_constrained
                   and self.spec is None)
        depth = self.config.steps_in_flight if overlap else 0  # launched steps left unprocessed when step() returns
        inflight = self._inflight
        while len(inflight) > depth:
            self._process(inflight.popleft(), touched)
        if self.spec is not None:
            self.spec.propose(self.scheduler.running)
        sched = self.scheduler.schedule()
        if sched.scheduled:
            inflight.append(self._launch(sched))
        elif inflight:  # all that can run is in flight
            self._process(inflight.popleft(), touched)
        elif self.structured_output.num_waiting:  # only grammars still compiling: wait for one, do not spin
            self.structured_output.wait(0.05)
        elif self.kv_connector is not None and self.kv_connector.pulling:  # only KV pulls in progress
            time.sleep(0.001)
        # The oldest step's tokens, while the newer ones run (at once if nothing is left to wait for).
        while len(inflight) > depth or (inflight and not self.requests):
            self._process(inflight.popleft(), touched)
        outputs = []
        for group in touched.values():
            if group.num_unfinished and group.output_kind is RequestOutputKind.FINAL_ONLY:
                continue
            outputs.append(self._make_output(group))
            if group.finished:
                del self.groups[group.request_id]
        return outputs

    def _launch(self, sched: SchedulerOutput) -> StepHandle:
        """Runs the step (asynchronously on CUDA) and books its tokens as computed at once, so that
        the next schedule sees them; a token it samples counts as pending until processed."""
        if self.workers is not None:
            self.workers.check_alive()
        prev = self._inflight[-1] if self._inflight and not self.scheduler.disjoint_steps else None  # tokens in flight come from it
        if self._num_constrained:
            sched.grammar_bitmask = self.structured_output.grammar_bitmask(sched)
        sched.builtin_processors = self._num_builtin > 0  # else the step's rows are not scanned for them
        handle = self.runner.execute(sched, self.kv_cache, prev)
        handle.kv_copies = sched.kv_copies
        for request, num_new in sched.scheduled:
            computed = request.num_computed_tokens
            if computed < len(request.prompt_token_ids):
                self.prompt_tokens += min(num_new, len(request.prompt_token_ids) - computed)
            request.num_computed_tokens = computed + num_new
        previous = None
        for row, request in enumerate(handle.requests):
            if request is not previous:  # a request verifying drafts has several rows, consecutive
                request.num_pending += 1
                request.pending_row = row
                previous = request
        return handle

    def _process(self, handle: StepHandle, touched: dict[str, _Group]) -> None:
        """Applies a step's results (waiting for them); rows of requests that finished meanwhile are dropped."""
        result = handle.result()
        if handle.kv_copies is not None and self.kv_cache.host_tier is not None:
            self.kv_cache.host_tier.mark_saved(handle.kv_copies)
        now = time.time()
        for request, entries in result.prompt_logprobs:
            if not request.status.finished:
                assert request.prompt_logprobs is not None
                request.prompt_logprobs.extend(entries)
        for request, vector in result.pooled:
            if not request.status.finished:
                request.pooling.result = vector
                self._finish(request, RequestStatus.FINISHED_STOPPED)
                key = request.parent_id or request.request_id
                touched[key] = self.groups[key]
        logprobs, groups, rows, sampled = result.logprobs, self.groups, handle.requests, result.sampled_token_ids
        row = 0
        while row < len(rows):
            request, end = rows[row], row + 1
            while end < len(rows) and rows[end] is request:
                end += 1
            if not request.status.finished:
                request.num_pending -= 1
                tokens = sampled[row:end]
                if request.spec_token_ids:
                    assert self.spec is not None
                    tokens = self.spec.verify(request.spec_token_ids, tokens)
                    request.spec_token_ids = []
                    request.num_computed_tokens -= end - row - len(tokens)  # the rejected drafts' KV is stale
                for j, token in enumerate(tokens):
                    self._append(request, token, None if logprobs is None else logprobs[row + j], now)
                    if request.status.finished:
                        break
                key = request.parent_id or request.request_id
                touched[key] = groups[key]
            row = end

    def _append(self, request: Request, token: int, logprobs: Any, now: float) -> None:
        request.append_token(token)
        self.generation_tokens += 1
        metrics = request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        if request.logprobs is not None:
            request.logprobs.append(logprobs)
            request.cumulative_logprob += logprobs[token].logprob
        stop = self._check_stop(request, token)
        if request.structured_output is not None and self.structured_output.accept(request, token) and stop is None:
            stop = RequestStatus.FINISHED_STOPPED  # the grammar has ended (a stop token, or ignore_eos past the end)
        if request.detokenizer is not None:
            stop_string = request.detokenizer.update([token], stop is RequestStatus.FINISHED_STOPPED)
            if stop_string is not None and stop is None:
                request.stop_reason, stop = stop_string, RequestStatus.FINISHED_STOPPED
        if stop is not None:
            self._finish(request, stop)

    def _fail_grammars(self, touched: dict[str, _Group]) -> None:
        """Ends the requests whose grammar failed to compile (their constraint had parsed, so this is rare)."""
        for request in self.structured_output.update():
            logger.error("request %s: grammar compilation failed: %s", request.request_id, request.structured_output.error)
            request.stop_reason = f"grammar compilation failed: {request.structured_output.error}"
            self._finish(request, RequestStatus.FINISHED_ABORTED)
            key = request.parent_id or request.request_id
            touched[key] = self.groups[key]

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params, num_output = request.params, len(request.output_token_ids)
        if num_output >= params.min_tokens:
            if token in (params.stop_token_ids or ()):
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if token in self.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
        if num_output >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if self.requests.get(request.request_id) is not request:
            return  # already finished
        del self.requests[request.request_id]
        self.scheduler.finish_request(request, status)
        if self.kv_connector is not None:  # a pull in progress, or blocks it holds for the request
            self.kv_connector.discard(request.request_id)
        request.metrics.finished_time = time.time()
        self._num_penalized -= request.params.needs_penalties
        self._num_builtin -= wants_builtin(request.params)
        self._num_constrained -= request.structured_output is not None
        self.groups[request.parent_id or request.request_id].num_unfinished -= 1

    # ---- outputs --------------------------------------------------------------------------
    def _make_output(self, group: _Group) -> RequestOutput | EmbeddingRequestOutput:
        """The group's output now (`step` skips unfinished FINAL_ONLY groups)."""
        first = group.children[0]
        if first.pooling is not None:  # finished (pooling requests are FINAL_ONLY); an abort leaves no vector
            return EmbeddingRequestOutput(group.request_id, EmbeddingOutput(first.pooling.result or []),
                                          first.prompt_token_ids, True)
        finished = group.finished
        delta = group.output_kind is RequestOutputKind.DELTA
        completions = []
        for child in group.children:
            sent_tokens, sent_logprobs = group.emitted.get(child.index, (0, 0))
            num_output = len(child.output_token_ids)
            news = sent_tokens < num_output or (child.status.finished and child.index not in group.emitted_final)
            if delta and not news:
                continue
            completions.append(self._completion(child, delta, sent_tokens, sent_logprobs))
            group.emitted[child.index] = (num_output, len(child.logprobs or ()))
            if child.status.finished:
                group.emitted_final.add(child.index)
        first = group.children[0]
        return RequestOutput(
            request_id=group.request_id,
            prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids,
            prompt_logprobs=first.prompt_logprobs,
            outputs=completions,
            finished=finished,
            num_cached_tokens=first.num_cached_tokens or 0,
            metrics=first.metrics,
        )

    def _completion(self, request: Request, delta: bool, sent_tokens: int, sent_logprobs: int) -> CompletionOutput:
        finished = request.status.finished
        text = ""
        if request.detokenizer is not None:
            text = request.detokenizer.get_next_output_text(finished, delta)
        token_ids = request.output_token_ids[sent_tokens:] if delta else list(request.output_token_ids)
        logprobs = None
        if request.logprobs is not None:
            logprobs = request.logprobs[sent_logprobs:] if delta else list(request.logprobs)
            if self.tokenizer is not None:
                self._decode_logprobs(logprobs)
        return CompletionOutput(
            index=request.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=request.cumulative_logprob if request.logprobs is not None else None,
            logprobs=logprobs,
            finish_reason=request.status.value if finished else None,
            stop_reason=request.stop_reason,
        )

    def _decode_logprobs(self, entries: list[Any]) -> None:
        from pagedllm.engine.detokenizer import decode_token

        for entry in entries:
            for token_id, logprob in entry.items():
                if logprob.decoded_token is None:
                    logprob.decoded_token = decode_token(self.tokenizer, token_id)

    # ---- introspection --------------------------------------------------------------------
    def get_stats(self) -> EngineStats:
        tier, connector, encoder = self.kv_cache.host_tier, self.kv_connector, self.scheduler.encoder
        # External: tokens looked up in / loaded from the host tier, and asked of / copied from a producer's pool.
        ext_queries = (0 if tier is None else tier.queries) + (0 if connector is None else connector.external_queries)
        ext_hits = (0 if tier is None else tier.hits) + (0 if connector is None else connector.external_hits)
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv_cache.usage,
            num_used_blocks=self.kv_cache.num_used_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            prefix_cache_queries=self.kv_cache.prefix_queries,
            prefix_cache_hits=self.kv_cache.prefix_hits,
            external_prefix_cache_queries=ext_queries,
            external_prefix_cache_hits=ext_hits,
            mm_cache_queries=0 if encoder is None else encoder.queries,
            mm_cache_hits=0 if encoder is None else encoder.hits,
            spec_decode=None if self.spec is None else self.spec.stats,
            running_loras=_lora_names(self.scheduler.running) if self.runner.lora else (),
            waiting_loras=_lora_names(self.scheduler.waiting) if self.runner.lora else (),
        )

    def add_lora(self, lora_request: Any) -> bool:
        """Loads and checks an adapter ahead of its requests (ValueError if it cannot run here)."""
        if self.runner.lora is None:
            raise ValueError("LoRA adapters need an engine started with enable_lora=True (--enable-lora).")
        self.runner.lora.add(lora_request)
        return True

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forgets an adapter (a request still naming it reloads it from its path); False if it was not loaded."""
        return self.runner.lora is not None and self.runner.lora.remove(lora_int_id)

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached block, so later requests compute their prompts from scratch."""
        self.kv_cache.reset_prefix_cache()
        return True

    # ---- the other ranks ------------------------------------------------------------------
    def on_failure(self, callback: FailureCallback) -> None:
        """`callback(error)` runs, on a watchdog thread, if a rank of this engine dies (never with one process)."""
        if self.workers is not None:
            self.workers.on_failure(callback)

    def shutdown(self) -> None:
        """Stops the other ranks of a parallel engine (also done when the engine is collected, or at exit)."""
        if self._shutdown is not None:
            self._shutdown()


def _lora_names(requests: Iterable[Request]) -> tuple[str, ...]:
    return tuple(sorted({r.lora_request.lora_name for r in requests if r.lora_request is not None}))


def _stop_workers(runner: ModelRunner, workers: Workers) -> None:
    runner.release_cuda_graphs()  # before the process group goes
    workers.shutdown()


def load_tokenizer(config: EngineConfig) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.tokenizer or config.model_path)


def _eos_token_ids(config: EngineConfig, tokenizer: Any) -> set[int]:
    """The ids that end generation, as transformers' generate sees them (generation_config first)."""
    from transformers import GenerationConfig

    ids: Any = None
    try:
        ids = GenerationConfig.from_pretrained(config.model_path).eos_token_id
    except OSError:
        pass
    if ids is None:
        ids = getattr(config.hf_config, "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return {ids} if isinstance(ids, int) else set(ids)
