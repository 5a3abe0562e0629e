"""Turns the scheduler's plan into flat tensors, runs the model once, samples.

The batch is flat: the scheduled tokens of every request one after another (decodes first),
with their positions, the cache slot each new token's K/V goes to, and per request the query
span, the context length and the block table. The KV cache pool is allocated here, once, in the model's dtype
or in float8 (--kv-cache-dtype fp8: half the bytes of bf16 per block, so twice the blocks in the same memory).

`execute` only launches: it returns a `StepHandle` whose sampled ids stay on the device (the next
step can take a token in flight from there) and whose `result()` waits for the host copy. On CUDA
nothing in `execute` synchronises, so the engine can schedule step N+1 while step N runs.

Under tensor/pipeline parallelism one runner lives on every rank, each with its slice of the model
and of the KV cache (the same block count everywhere). The driver's (rank 0, in the engine
process) `execute` broadcasts each step's `StepPlan`; the other ranks `follow`, running the same
forward and the same logits calls so that their collectives pair up. Sampling runs on the driver
only, from logits gathered to it (and sent from the last stage under pipeline parallelism).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from pagedllm.attention.backend import (
    GRAPH_BATCH_SIZES, KV_FP8, AttentionMetadata, dummy_metadata, get_attention_backend,
)
from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache import KVCacheManager
from pagedllm.core.scheduler import SchedulerOutput
from pagedllm.distributed.communication import broadcast_object, min_over_world, recv, send, tp_broadcast
from pagedllm.distributed.parallel_state import ParallelState, building
from pagedllm.engine.request import Request
from pagedllm.kv_transfer.host_store import HostKVStore
from pagedllm.kv_transfer.host_tier import BlockCopies
from pagedllm.kv_transfer.ipc_pool import SharedMemoryPool
from pagedllm.kv_transfer.layer_events import LayerEvents
from pagedllm.layers.attention import Attention, forward_context
from pagedllm.logits_process.state import LogitsProcessors
from pagedllm.lora.layers import LoRABatch, LoRAPlan, lora_context
from pagedllm.lora.manager import LoRAManager
from pagedllm.models.loader import load_model
from pagedllm.multimodal.encoder_cache import EncoderCache, EncoderWork
from pagedllm.pooling.pooler import Pooler
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.cuda_graph import CudaGraphRunner
from pagedllm.worker.piecewise_graph import PiecewiseGraphRunner
from pagedllm.worker.input_batch import FlatBatch, StepPlan, build_batch, Staging
from pagedllm.worker.sampler import Sampler, SamplingBatch, compute_topk_logprobs, to_device
from pagedllm.worker.step_output import PromptLogprobs, StepHandle

_CPU_KV_CACHE_BYTES = 4 << 30
_KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype for EngineConfig.kv_cache_dtype: auto is the model's, fp8 (= fp8_e4m3) float8_e4m3fn."""
    if name not in _KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(_KV_CACHE_DTYPES)}; got {name!r}.")
    return model_dtype if name == "auto" else KV_FP8


_NO_INT32 = np.empty(0, dtype=np.int32)


def held_elsewhere(device: torch.device, utilization: float) -> int:
    """Bytes of a CUDA device in use before this engine loads anything (other processes, such as a second engine
    sharing the GPU, and this process's context), which `gpu_memory_utilization` leaves out of this engine's share
    as vLLM does; an error if the share no longer fits beside them. 0 off CUDA."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    held = (total - free) - torch.cuda.memory_reserved(device)
    if held + utilization * total > total:
        raise ValueError(f"gpu_memory_utilization={utilization} asks for {utilization * total / 2**30:.1f} GiB of "
                         f"{torch.cuda.get_device_name(device)}, but only {free / 2**30:.1f} of its {total / 2**30:.1f} "
                         "GiB are free (other processes hold the rest): lower it, or stop them.")
    return held


def _host_ids(step: StepHandle | None) -> list[int]:
    """A launched step's sampled ids on the host (waiting for the step)."""
    assert step is not None, "a token in flight comes from the previous step"
    if step.event is not None:
        step.event.synchronize()
    return step.host_token_ids.tolist()


class ModelRunner:
    def __init__(self, config: EngineConfig, parallel: ParallelState | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.kv_dtype = kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.block_size = config.block_size
        hf = config.hf_config
        assert config.model_path is not None
        torch.manual_seed(config.seed)
        self.parallel = parallel or ParallelState()  # this rank's place in the engine's world (alone by default)
        self.distributed = self.parallel.world_size > 1
        self.memory_held_elsewhere = held_elsewhere(self.device, config.gpu_memory_utilization)
        with building(self.parallel):
            self.model: nn.Module = load_model(hf, config.model_path, self.dtype, self.device, config.load_format,
                                                   config.quantization)
        self.vocab_size: int = hf.vocab_size
        self.hidden_size: int = hf.hidden_size
        self.pooler = Pooler.for_model(config.model_path, self.model, config.pooler_config) if config.runner == "pooling" else None
        # A vision-language model's image embeddings by image hash (multimodal/encoder_cache.py).
        self.encodes_images = hasattr(self.model, "encode_images")
        self.bidirectional_images = bool(getattr(self.model, "bidirectional_images", False))  # Gemma 3
        self.encoder_cache = EncoderCache() if self.encodes_images else None
        self.lora: LoRAManager | None = None
        if config.enable_lora:
            assert config.max_cpu_loras is not None
            self.lora = LoRAManager(self.model, config.max_loras, config.max_lora_rank, config.max_cpu_loras)
        if config.speculative_config is not None and config.speculative_config.method == "eagle3":
            from pagedllm.spec_decode.eagle import enable_aux_hidden

            assert config.max_num_batched_tokens is not None
            enable_aux_hidden(self.model, max(config.max_num_batched_tokens, config.max_num_seqs), self.device)
        # Pipeline stages pass activations on and send the logits back; one stage calls the model directly.
        single_stage = self.parallel.pp_size == 1
        self.run_model = self.model if single_stage else self._run_stage
        self.compute_logits = self.model.compute_logits if single_stage else self._stage_logits
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.backend = get_attention_backend(config.attention_backend, self.device)
        self.sampler = Sampler()
        # Logits processors (built-in and custom) run where sampling does: on the driver of a generating model.
        self.logits_processors: LogitsProcessors | None = None
        if self.pooler is None and self.parallel.rank == 0:
            self.logits_processors = LogitsProcessors(config, self.device, config.logits_processors,
                                                      track_pending=bool(config.async_scheduling))
        self.graph_runner: CudaGraphRunner | None = None
        self.piecewise: PiecewiseGraphRunner | None = None
        self.layer_events: LayerEvents | None = None  # set by a CUDA KV producer (kv_transfer/layer_events.py)
        self.num_blocks = self._allocate_kv_cache()
        self.capture_cuda_graphs()
        # Persistent host buffers, one of each per step that can be in flight at once, used in turn (see Staging).
        assert config.max_num_batched_tokens is not None
        tokens, seqs = config.max_num_batched_tokens, config.max_num_seqs
        self._num_turns = config.steps_in_flight + 1
        self._staging = Staging(self.device, 8 * (3 * tokens + 3 * seqs) + 4 * (2 * seqs + 1 + seqs * 16) + 64, self._num_turns)
        self._turn = 0
        self._sampling_cache: tuple[list[Request], SamplingBatch] | None = None
        # EAGLE (spec_decode/eagle.py) reads the last step's hidden states: (hidden, [(request id, first position,
        # first flat row, tokens)] per scheduled request), kept only when keep_hidden is set.
        self.keep_hidden = False
        self.last_step: tuple[torch.Tensor, list[tuple[str, int, int, int]]] | None = None
        self._sample_stream: torch.cuda.Stream | None = None
        if self.device.type == "cuda":
            self._host_ids = [torch.empty(seqs, dtype=torch.int64, pin_memory=True) for _ in range(self._num_turns)]
            self._events = [torch.cuda.Event() for _ in range(self._num_turns)]
            if self.parallel.pp_size > 1:
                # The driver waits for the last stage's logits on a stream of its own, so that its first stage
                # can run the next micro-batch meanwhile.
                self._sample_stream = torch.cuda.Stream(self.device)

    # ---- KV cache -----------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        if not self.attn_layers:
            return 0  # an encoder: its blocks only number the tokens of a step
        layer = self.attn_layers[0]
        per_layer = 2 * self.block_size * layer.num_kv_heads * layer.head_dim * self.kv_dtype.itemsize
        return per_layer * len(self.attn_layers)

    def _allocate_kv_cache(self) -> int:
        from pagedllm.spec_decode.draft_model import kv_reservation

        self.host_store: HostKVStore | None = None
        self.num_host_slots = 0
        self.kv_shared_pool: SharedMemoryPool | None = None  # an IpcConnector producer's CPU pool, mapped by consumers
        if not self.attn_layers:  # an encoder keeps no KV: blocks for every sequence at full length, costing nothing
            return self.config.max_num_seqs * self.config.max_blocks_per_seq
        # A draft model (speculative decoding) shares the budget: its weights, and a block of its own per block here.
        draft_weights, draft_per_block = kv_reservation(self.config)
        budget = self.config.kv_cache_memory
        if budget is None:
            budget = self._profile_free_gpu_memory() - draft_weights if self.device.type == "cuda" else _CPU_KV_CACHE_BYTES
        num_blocks = self.config.num_gpu_blocks_override or budget // (self.kv_bytes_per_block() + draft_per_block)
        if self.distributed:
            num_blocks = min_over_world(self.parallel, num_blocks)  # a block id must mean the same slot on every rank
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes is less than one KV block ({self.kv_bytes_per_block()} bytes).")
        transfer = self.config.kv_transfer_config
        if transfer is not None and transfer.shares_pool and self.device.type == "cpu":
            shapes = [(2, num_blocks, self.block_size, lay.num_kv_heads, lay.head_dim) for lay in self.attn_layers]
            self.kv_shared_pool = SharedMemoryPool(shapes, self.kv_dtype)  # zeroed too
        for i, layer in enumerate(self.attn_layers):
            # Zeroed: padded reads past a sequence's end must meet finite values (0 * NaN would poison softmax @ V).
            shared = self.kv_shared_pool
            layer.bind_kv_cache(self._kv_blocks(layer, num_blocks) if shared is None else shared.tensors[i])
        self._allocate_host_tier()
        return int(num_blocks)

    def _allocate_host_tier(self) -> None:
        """The host-memory tier of the prefix cache (kv_offload_bytes): as many slots as fit, the same on every rank."""
        caches = [layer.kv_cache for layer in self.attn_layers]
        connector, slot_bytes = self.config.kv_transfer_config, HostKVStore.slot_bytes(caches)
        size = self.config.kv_offload_bytes
        if not size and connector is not None:
            size = connector.offload_bytes(slot_bytes)
        if not size:
            return
        slots = size // slot_bytes
        if self.distributed:
            slots = min_over_world(self.parallel, slots)
        if slots < 1:
            raise ValueError(f"kv_offload_bytes={size} is less than one block of every layer ({slot_bytes} bytes).")
        self.host_store, self.num_host_slots = HostKVStore(caches, int(slots)), int(slots)

    def _host_store(self) -> HostKVStore:
        assert self.host_store is not None, "host-tier copies without kv_offload_bytes"
        return self.host_store

    def _kv_blocks(self, layer: Attention, num_blocks: int) -> torch.Tensor:
        shape = (2, num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
        return torch.zeros(shape, dtype=self.kv_dtype, device=self.device)

    @torch.inference_mode()
    def _profile_free_gpu_memory(self) -> int:
        """Runs one forward at the largest batch a step can hold, then leaves the KV cache
        `gpu_memory_utilization` of the device minus weights, activation peak and non-torch memory."""
        tokens = self.config.max_num_batched_tokens or 1
        reqs = min(self.config.max_num_seqs, tokens)
        for layer in self.attn_layers:  # one scratch block: the dummy batch reads block 0 and writes nothing
            layer.bind_kv_cache(self._kv_blocks(layer, 1))
        query_lens = [tokens // reqs + (1 if i < tokens % reqs else 0) for i in range(reqs)]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        hidden = self._dummy_forward(query_lens, query_lens)
        logits = self.compute_logits(hidden[:reqs])
        if logits is not None:
            filtered, plain = (
                SamplingBatch.build([params] * reqs, [None] * reqs, [[0]] * reqs, [[0]] * reqs, self.vocab_size, self.device)
                for params in (SamplingParams(temperature=1.0, top_p=0.9, top_k=50), SamplingParams(temperature=0.7))
            )
            # The filters' peak memory on a float32 copy (as after logit edits), then the raw logits: every
            # sampling kernel variant compiles now, not mid-run.
            greedy = SamplingBatch(reqs, self.vocab_size, all_greedy=True)
            for batch, step_logits in ((filtered, logits.float()), (filtered, logits), (plain, logits), (greedy, logits), (greedy, logits.float())):
                self.sampler(step_logits, batch)
        torch.cuda.synchronize()
        self.activation_peak = torch.cuda.max_memory_allocated(self.device) - before
        del hidden, logits
        for layer in self.attn_layers:
            layer.bind_kv_cache(torch.empty(0))
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        # Memory outside torch's allocator that this engine added (workspaces, communicators): what other processes
        # (a second engine on the GPU) and this context held at start is not this engine's to count.
        non_torch = max(0, (total - free) - torch.cuda.memory_reserved(self.device) - self.memory_held_elsewhere)
        weights = torch.cuda.memory_allocated(self.device)
        return max(0, int(total * self.config.gpu_memory_utilization) - weights - self.activation_peak - non_torch)

    def _dummy_forward(self, query_lens: list[int], seq_lens: list[int], common_prefix: int = 0) -> torch.Tensor:
        """A forward over a dummy batch (attention.backend.dummy_metadata)."""
        meta = dummy_metadata(query_lens, seq_lens, self.block_size, self.device, common_prefix)
        ids = torch.zeros(sum(query_lens), dtype=torch.int64, device=self.device)
        with forward_context(self.backend, meta):
            return self.run_model(ids, ids)

    @torch.inference_mode()
    def _compile_kernels(self) -> None:
        """Long-context decodes of one and two requests, run eagerly, and a batch sharing a prefix: the
        split-KV and shared-prefix attention kernels and both GEMV variants compile now rather than in the
        first step that needs them (a second or so of a benchmark's timed run otherwise)."""
        assert self.config.max_model_len is not None
        for reqs in (1, 2):
            self._dummy_forward([1] * reqs, [min(self.config.max_model_len, 4096)] * reqs)
        shared_min = self.backend.shared_prefix_min
        if shared_min is not None and shared_min[1] < self.config.max_model_len:
            # The smallest batch that takes the path (with few KV heads, split-KV takes the smaller ones).
            kv_heads = self.attn_layers[0].num_kv_heads
            sizes = [s for s in GRAPH_BATCH_SIZES if s <= self.config.max_num_seqs and self.backend.takes_shared_prefix(s, kv_heads, self.device)]
            if sizes:
                tokens = shared_min[1]
                self._dummy_forward([1] * sizes[0], [tokens + 1] * sizes[0], common_prefix=tokens)

    def capture_cuda_graphs(self) -> None:
        """On CUDA: compiles the kernels, then captures the decode graphs and the piecewise ones. Every rank
        runs this at start-up, in the same order, so the collectives of the warm-up forwards and of the
        captures pair up."""
        if self.device.type != "cuda" or not self.attn_layers:  # encoders run eagerly, without paged attention
            return
        self._compile_kernels()
        if self.config.enforce_eager:
            return
        inter = None if self.parallel.is_first_stage else (self.hidden_size, self.dtype)
        self.graph_runner = CudaGraphRunner(
            self.model, self.backend, self.config.max_num_seqs, self.config.max_blocks_per_seq, self.device, intermediate=inter,
            lora=self.lora is not None,
        )
        self.graph_runner.capture()
        if self.lora is not None:
            return  # steps with prompts run eagerly with LoRA: the segmented kernels take their segments from the host
        assert self.config.max_num_batched_tokens is not None
        self.piecewise = PiecewiseGraphRunner(self.model, self.backend, self.config.max_num_batched_tokens, self.block_size, self.device, inter)
        self.piecewise.capture(self.graph_runner.pool, self.graph_runner.stream)

    def release_cuda_graphs(self) -> None:
        for runner in (self.graph_runner, self.piecewise):
            if runner is not None:
                runner.release()
        self.graph_runner = self.piecewise = None

    # ---- one step -----------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, kv_cache: KVCacheManager, prev: StepHandle | None = None) -> StepHandle:
        """Launches one step and returns at once on CUDA (nothing here waits for the device); the
        handle's `result()` waits. A request with a token still in flight reads it from `prev`, the
        step that samples it, on the device."""
        batch = build_batch(sched, kv_cache, self.backend.shared_prefix_min, self.bidirectional_images)
        spans = self._prompt_logprob_spans(sched, batch)
        lora = None if self.lora is None else self._lora_plan(sched, batch)
        copies = sched.kv_copies
        if self.distributed:
            broadcast_object(self.parallel, StepPlan(batch, [(lo, hi) for _, _, lo, hi in spans],
                                                     0 if prev is None else len(prev.requests), lora, copies,
                                                     sched.encoder_work))
        turn, self._turn = self._turn, (self._turn + 1) % self._num_turns
        prev_ids = None if prev is None else prev.token_ids
        hidden, logits_index = self._step_forward(batch, prev_ids, turn, lora, copies, sched.encoder_work)
        if self.keep_hidden:  # the final hidden states, or an EAGLE-3 head's three layers' (written by the forward)
            aux = getattr(getattr(self.model, "model", None), "aux_buffer", None)
            starts = batch.query_start_loc.tolist()
            self.last_step = (hidden if aux is None else aux[: hidden.shape[0]],
                              [(r.request_id, r.num_computed_tokens, starts[i], n) for i, (r, n) in enumerate(sched.scheduled)])
        pooled = self._pool(sched, batch, hidden) if self.pooler is not None else []
        # The sampled rows, selected on this stream: the index lives in the staging buffer the next step refills.
        rows = hidden if logits_index is None or not batch.sample_rows else hidden.index_select(0, logits_index)
        if self._sample_stream is None:
            handle = self._sample(sched, batch, spans, hidden, rows, turn, prev)
        else:
            self._sample_stream.wait_stream(torch.cuda.current_stream(self.device))
            rows.record_stream(self._sample_stream)
            with torch.cuda.stream(self._sample_stream):
                handle = self._sample(sched, batch, spans, hidden, rows, turn, prev)
        handle.pooled = pooled
        return handle

    def _pool(self, sched: SchedulerOutput, batch: FlatBatch, hidden: torch.Tensor) -> list[tuple[Request, torch.Tensor]]:
        """Feeds each pooling request's rows of this step to its pooling state; the vectors of those whose prompt
        this step completes."""
        assert self.pooler is not None
        done, pooled = [], []
        starts = batch.query_start_loc
        for i, (request, n) in enumerate(sched.scheduled):
            state = request.pooling
            if state is None:
                continue
            rows = hidden[int(starts[i]) : int(starts[i]) + n]
            state.add(rows)
            if request.num_computed_tokens + n == len(request.prompt_token_ids):
                done.append(request)
                pooled.append(state.pooled(self.pooler, rows[-1]))
        if not done:
            return []
        vectors = self.pooler.head(self.model, [r.pooling.params for r in done], torch.stack(pooled))
        return list(zip(done, vectors))

    def _sample(
        self, sched: SchedulerOutput, batch: FlatBatch, spans: list[tuple[Request, range, int, int]],
        hidden: torch.Tensor, rows: torch.Tensor, turn: int, prev: StepHandle | None = None,
    ) -> StepHandle:
        """Logits of the rows that sample, the sampling itself and the copies to the host (all launched). `prev`: the
        step whose tokens are in flight, which logits processors may need to see (then this waits for it)."""
        prompt_logprobs = self._prompt_logprobs(spans, hidden)
        requests = [sched.scheduled[r][0] for r in batch.sample_rows]
        logprobs = None
        if requests:
            logits = self.compute_logits(rows)
            if sched.grammar_bitmask is not None:  # constrained rows: tokens their grammar forbids -> -inf
                sched.grammar_bitmask.apply(logits)
            # Rows without sampling params (a proposer's draft views) never meet the processors.
            procs = self.logits_processors if isinstance(requests[0], Request) else None
            with_procs = procs is not None and procs.prepare(requests, lambda: _host_ids(prev),
                                                             sched.builtin_processors)
            # The raw logits, in the model's dtype: the sampler upcasts only where it must.
            if all(r.plain_greedy for r in requests):
                sampling = SamplingBatch(len(requests), self.vocab_size, all_greedy=True)
            else:
                sampling = self._sampling_batch(requests)
            if with_procs:
                sampling = dataclasses.replace(sampling, all_greedy=False, logits_processors=procs)
            result = self.sampler(logits, sampling)
            token_ids = result.token_ids
            if result.logprobs is not None:
                ids, values, ranks = result.logprob_token_ids, result.logprobs, result.sampled_ranks
                assert ids is not None and ranks is not None
                logprobs = (self._to_host(ids), self._to_host(values), self._to_host(ranks))
        else:
            token_ids = torch.empty(0, dtype=torch.int64, device=self.device)
        event = None
        if self.device.type == "cuda":
            host_ids, event = self._host_ids[turn], self._events[turn]
            if host_ids.numel() < len(requests):
                host_ids = self._host_ids[turn] = torch.empty(len(requests), dtype=torch.int64, pin_memory=True)
            host_ids = host_ids[: len(requests)]
            host_ids.copy_(token_ids, non_blocking=True)
            event.record()  # on the current stream: the sampling one under pipeline parallelism
        else:
            host_ids = token_ids
        return StepHandle(requests, token_ids, host_ids, event, logprobs, prompt_logprobs)

    def _lora_plan(self, sched: SchedulerOutput, batch: FlatBatch) -> LoRAPlan | None:
        """The driver's slot for each of the step's adapters (loading those not in one) and each flat token's slot
        (-1: the base model); None if no request in the step has an adapter."""
        assert self.lora is not None
        adapters = {r.lora_request.lora_int_id: r.lora_request for r, _ in sched.scheduled if r.lora_request is not None}
        if not adapters:
            return None
        slot = self.lora.activate(adapters)
        per_row = [-1 if r.lora_request is None else slot[r.lora_request.lora_int_id] for r, _ in sched.scheduled]
        tokens = np.repeat(np.array(per_row, dtype=np.int64), np.diff(batch.query_start_loc))
        return LoRAPlan({slot[i]: request for i, request in adapters.items()}, tokens, batch.max_query_len == 1)

    def _lora_batch(self, plan: LoRAPlan | None) -> LoRABatch | None:
        """The step's LoRA inputs on this rank (its adapters already in their slots): the token slots on the device
        (copied without a host sync), and on CUDA for steps with prompts, grouped by slot for the segmented kernels
        (decode-only steps, in a graph or not, take the row-indexed one)."""
        if plan is None:
            return None
        segments = None
        if self.device.type == "cuda" and not plan.decode_only:
            from pagedllm.kernels.lora import LoRASegments

            segments = LoRASegments.build(plan.token_slots, self.device)
        return LoRABatch(to_device(plan.token_slots, torch.int64, self.device), segments)

    @torch.inference_mode()
    def forward_rows(self, sched: SchedulerOutput, kv_cache: KVCacheManager) -> torch.Tensor:
        """One forward (eager: speculative-decoding heads) returning the hidden states of the rows that would
        sample, in sample-row order, for a caller that computes logits and more from them itself."""
        batch = build_batch(sched, kv_cache, bidirectional_images=self.bidirectional_images)
        turn, self._turn = self._turn, (self._turn + 1) % self._num_turns
        hidden, logits_index = self._forward(batch, None, turn)
        return hidden if logits_index is None else hidden.index_select(0, logits_index)

    @torch.inference_mode()
    def follow(self) -> None:
        """The loop of every rank but the driver: runs each step the driver broadcasts, with the same
        logits calls in the same order (their collectives pair with the driver's), until it sends None."""
        turn = 0
        while (plan := broadcast_object(self.parallel)) is not None:
            batch: FlatBatch = plan.batch
            prev_ids = torch.empty(plan.num_prev_sampled, dtype=torch.int64, device=self.device) if batch.fill_dst.size else None
            if plan.lora is not None:  # the driver's adapters, in the driver's slots
                assert self.lora is not None
                self.lora.activate({r.lora_int_id: r for r in plan.lora.adapters.values()},
                                   {r.lora_int_id: slot for slot, r in plan.lora.adapters.items()})
            hidden, logits_index = self._step_forward(batch, prev_ids, turn, plan.lora, plan.kv_copies,
                                                      plan.encoder_work)
            turn = (turn + 1) % self._num_turns
            for lo, hi in plan.prompt_rows:
                self.compute_logits(hidden[lo:hi])
            if batch.sample_rows:
                self.compute_logits(hidden if logits_index is None else hidden.index_select(0, logits_index))

    def _step_forward(self, batch: FlatBatch, prev_ids: torch.Tensor | None, turn: int, lora: LoRAPlan | None,
                      copies: BlockCopies | None, encoder_work: EncoderWork | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A step's forward as every rank runs it: images encoded and host-tier loads before it, saves after it
        (stream-ordered), under the step's adapters."""
        if encoder_work is not None:
            assert self.encoder_cache is not None
            self.encoder_cache.apply(encoder_work, self.model.encode_images)
        if copies is not None:
            self._host_store().load(copies)
        with lora_context(self._lora_batch(lora)):
            out = self._forward(batch, prev_ids, turn)
        if self.layer_events is not None:
            self.layer_events.step_done()
        if copies is not None:
            self._host_store().save(copies)
        return out

    def _forward(self, batch: FlatBatch, prev_ids: torch.Tensor | None, turn: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stages the batch, fills in tokens in flight from `prev_ids` (the previous step's sampled ids),
        runs the model; returns the hidden states and the flat indices of the rows to sample."""
        shared = np.array([batch.common_prefix_len], dtype=np.int32) if batch.common_prefix_len else _NO_INT32
        input_ids, positions, slot_mapping, fill_dst, fill_src, logits_index, query_start_loc, seq_lens, tables, common_prefix = self._staging.pack(
            [batch.input_ids, batch.positions, batch.slot_mapping, batch.fill_dst, batch.fill_src, batch.logits_index],
            [batch.query_start_loc, batch.seq_lens, batch.block_tables, shared], turn,
        )
        assert input_ids is not None and positions is not None and slot_mapping is not None
        assert query_start_loc is not None and seq_lens is not None and tables is not None
        if fill_dst is not None and self.parallel.is_first_stage:  # later stages never read input ids
            assert prev_ids is not None and fill_src is not None, "a token in flight needs the step that samples it"
            if self.parallel.tp_size > 1:
                tp_broadcast(prev_ids, self.parallel)  # the driver's sampled ids, to the first stage's other ranks
            input_ids.index_copy_(0, fill_dst, prev_ids.index_select(0, fill_src))
        num_reqs = len(batch.seq_lens)
        images = batch.mm_segments is not None  # image tokens: eager, their embeddings put in place of the tokens'
        decodes = batch.num_decodes == num_reqs
        if not images and self.graph_runner is not None and decodes and self.graph_runner.can_run(num_reqs):
            inter = None if self.parallel.pp_size == 1 else self._recv_intermediate(num_reqs)
            out = self.graph_runner.run(input_ids, positions, slot_mapping, seq_lens, tables, inter, common_prefix)
            return self._pass_on(out), logits_index
        meta = AttentionMetadata(
            num_reqs=num_reqs, num_decodes=batch.num_decodes, num_decode_tokens=batch.num_decodes,
            max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len,
            query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=tables, slot_mapping=slot_mapping,
            query_start_loc_cpu=batch.query_start_loc.tolist(), seq_lens_cpu=batch.seq_lens.tolist(),
            common_prefix=common_prefix,
            key_limits=None if batch.key_limits is None else to_device(batch.key_limits, torch.int32, self.device),
        )
        kv_written = None if self.layer_events is None else self.layer_events.written
        if not images and self.piecewise is not None and self.piecewise.can_run(input_ids.shape[0]):
            inter = None if self.parallel.pp_size == 1 else self._recv_intermediate(input_ids.shape[0])
            out = self.piecewise.run(input_ids, positions, slot_mapping, meta, inter, kv_written)
            return self._pass_on(out), logits_index
        token_types = None if batch.token_type_ids is None else torch.from_numpy(batch.token_type_ids).to(self.device)
        mm_embeds = None
        if images:
            positions, mm_embeds = self._image_inputs(batch, positions)
        with forward_context(self.backend, meta, token_type_ids=token_types, mm_embeds=mm_embeds, kv_written=kv_written):
            return self.run_model(input_ids, positions), logits_index

    def _image_inputs(self, batch: FlatBatch, positions: torch.Tensor,
                      ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """A step with image tokens: the flat rows whose token embeddings their images' cached embeddings replace, and
        the positions (3-axis for M-RoPE models)."""
        assert self.encoder_cache is not None and batch.mm_segments is not None
        cache = self.encoder_cache.tensors
        rows = np.concatenate([np.arange(dst, dst + n) for dst, _, _, n in batch.mm_segments])
        embeds = torch.cat([cache[key][src : src + n] for _, key, src, n in batch.mm_segments])
        if batch.mrope_positions is not None:
            positions = to_device(batch.mrope_positions, torch.int64, self.device)
        return positions, (to_device(rows, torch.int64, self.device), embeds)

    def _run_stage(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One pipeline stage: (hidden, residual) in from the previous stage, this stage's layers, out to the next."""
        return self._pass_on(self.model(input_ids, positions, self._recv_intermediate(input_ids.shape[0])))

    def _recv_intermediate(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        p = self.parallel
        if p.is_first_stage:
            return None
        shape = (num_tokens, self.hidden_size)
        hidden, residual = recv([shape, shape], self.dtype, self.device, src=p.rank - p.tp_size)
        return hidden, residual

    def _pass_on(self, out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Sends a stage's (hidden, residual) to the next stage. Only the last stage ends with hidden
        states; the others return an empty [T, 0] stand-in, whose row count is all the logits calls need."""
        if isinstance(out, torch.Tensor):
            return out
        p = self.parallel
        send(list(out), dst=p.rank + p.tp_size)
        return out[0][:, :0]

    def _stage_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits under pipeline parallelism: computed by the last stage, sent by its leader to the driver."""
        p = self.parallel
        if p.is_last_stage:
            logits = self.model.compute_logits(hidden)
            if logits is not None:
                send([logits], dst=0)
            return None
        if p.rank == 0:
            return recv([(hidden.shape[0], self.vocab_size)], self.dtype, self.device, src=(p.pp_size - 1) * p.tp_size)[0]
        return None

    def _sampling_batch(self, requests: list[Request]) -> SamplingBatch:
        cached = self._sampling_cache
        if cached is not None and cached[0] == requests:  # same rows (by identity) as last time
            return cached[1]
        # Penalties read the output history, which a token in flight would leave stale (the engine
        # runs such batches synchronously); min_tokens only needs the count.
        assert not any(r.num_pending and r.params.needs_penalties for r in requests)
        # A request that verifies drafts has a row per position: row j's history holds the drafts before it.
        outputs, counts, previous, j = [], [], None, 0
        for r in requests:
            j = j + 1 if r is previous else 0
            previous = r
            outputs.append(r.output_token_ids + r.spec_token_ids[:j] if j else r.output_token_ids)
            counts.append(r.num_output_tokens + r.num_pending + j)
        batch = SamplingBatch.build(
            [r.params for r in requests], [r.generator for r in requests],
            [r.prompt_token_ids for r in requests], outputs, self.vocab_size, self.device, num_output_tokens=counts,
        )
        # Reused while the rows stay the same, unless it depends on what was generated so far.
        self._sampling_cache = (requests, batch) if batch.stop_index is None and batch.penalty_rows is None else None
        return batch

    def _prompt_logprob_spans(self, sched: SchedulerOutput, batch: FlatBatch) -> list[tuple[Request, range, int, int]]:
        """Per request that wants prompt logprobs from this step's tokens: the prompt positions, and their flat rows."""
        out: list[tuple[Request, range, int, int]] = []
        if not batch.any_prompt_logprobs:
            return out
        for row, (request, num_new) in enumerate(sched.scheduled):
            start = request.num_computed_tokens
            span = request.prompt_logprob_span(start, start + num_new)
            if span:
                offset = int(batch.query_start_loc[row]) - start
                out.append((request, span, offset + span.start, offset + span.stop))
        return out

    def _prompt_logprobs(self, spans: list[tuple[Request, range, int, int]], hidden: torch.Tensor) -> list[PromptLogprobs]:
        out: list[PromptLogprobs] = []
        for request, span, lo, hi in spans:
            logits = self.compute_logits(hidden[lo:hi]).float()
            targets = to_device(request.prompt_token_ids[span.start + 1 : span.stop + 1], torch.int64, self.device)
            k = request.params.prompt_logprobs or 0
            ids, values, ranks = compute_topk_logprobs(logits, targets, k)
            out.append((request, k, self._to_host(ids), self._to_host(values), self._to_host(ranks)))
        return out

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """An asynchronous copy to pinned memory on CUDA (read after the step's event)."""
        if self.device.type != "cuda":
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor, non_blocking=True)
