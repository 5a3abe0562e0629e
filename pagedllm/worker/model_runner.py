"""Turns the scheduler's plan into flat tensors, runs the model once, samples.

The batch is flat: the scheduled tokens of every request one after another (decodes first),
with their positions, the cache slot each new token's K/V goes to, and per request the query
span, the context length and the block table. The KV cache pool is allocated here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np
import torch
from torch import nn

from pagedllm.attention.backend import AttentionMetadata, get_attention_backend
from pagedllm.config import EngineConfig
from pagedllm.core.scheduler import SchedulerOutput
from pagedllm.engine.request import Request
from pagedllm.layers.attention import Attention, forward_context
from pagedllm.models.loader import load_model
from pagedllm.outputs import Logprob, LogprobsDict
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.cuda_graph import CudaGraphRunner
from pagedllm.worker.sampler import Sampler, SamplingBatch, compute_topk_logprobs

_CPU_KV_CACHE_BYTES = 4 << 30


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, LogprobsDict] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[LogprobsDict]] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        hf = config.hf_config
        assert config.model_path is not None
        torch.manual_seed(config.seed)
        self.model: nn.Module = load_model(hf, config.model_path, self.dtype, self.device, config.load_format)
        self.vocab_size: int = hf.vocab_size
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.backend = get_attention_backend(config.attention_backend, self.device)
        self.sampler = Sampler()
        self.graph_runner: CudaGraphRunner | None = None
        self.num_blocks = self._allocate_kv_cache()
        self.capture_cuda_graphs()

    # ---- KV cache -----------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        layer = self.attn_layers[0]
        per_layer = 2 * self.block_size * layer.num_kv_heads * layer.head_dim * self.dtype.itemsize
        return per_layer * len(self.attn_layers)

    def _allocate_kv_cache(self) -> int:
        budget = self.config.kv_cache_memory
        if budget is None:
            budget = self._profile_free_gpu_memory() if self.device.type == "cuda" else _CPU_KV_CACHE_BYTES
        num_blocks = self.config.num_gpu_blocks_override or budget // self.kv_bytes_per_block()
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes is less than one KV block ({self.kv_bytes_per_block()} bytes).")
        for layer in self.attn_layers:
            # Zeroed: padded reads past a sequence's end must meet finite values (0 * NaN would poison softmax @ V).
            layer.kv_cache = torch.zeros(
                2, num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim, dtype=self.dtype, device=self.device
            )
        return int(num_blocks)

    @torch.inference_mode()
    def _profile_free_gpu_memory(self) -> int:
        """Runs one forward at the largest batch a step can hold, then leaves the KV cache
        `gpu_memory_utilization` of the device minus weights, activation peak and non-torch memory."""
        tokens = self.config.max_num_batched_tokens or 1
        reqs = min(self.config.max_num_seqs, tokens)
        for layer in self.attn_layers:  # one scratch block: the dummy batch reads block 0 and writes nothing
            layer.kv_cache = torch.zeros(2, 1, self.block_size, layer.num_kv_heads, layer.head_dim, dtype=self.dtype, device=self.device)
        query_lens = [tokens // reqs + (1 if i < tokens % reqs else 0) for i in range(reqs)]
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        max_blocks = -(-max(query_lens) // self.block_size)
        meta = AttentionMetadata(
            num_reqs=reqs, num_decodes=0, num_decode_tokens=0, max_query_len=max(query_lens), max_seq_len=max(query_lens),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(query_lens, dtype=torch.int32, device=self.device),
            block_tables=torch.zeros(reqs, max_blocks, dtype=torch.int32, device=self.device),
            slot_mapping=torch.full((tokens,), -1, dtype=torch.int64, device=self.device),
            query_start_loc_cpu=qsl, seq_lens_cpu=query_lens,
        )
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        ids = torch.zeros(tokens, dtype=torch.int64, device=self.device)
        with forward_context(self.backend, meta):
            hidden = self.model(ids, ids)
        logits = self.model.compute_logits(hidden[:reqs]).float()
        self.sampler(logits, SamplingBatch.build([SamplingParams(temperature=1.0, top_p=0.9, top_k=50)] * reqs, [None] * reqs,
                                                 [[0]] * reqs, [[0]] * reqs, self.vocab_size, self.device))
        torch.cuda.synchronize()
        self.activation_peak = torch.cuda.max_memory_allocated(self.device) - before
        del hidden, logits
        for layer in self.attn_layers:
            layer.kv_cache = torch.empty(0)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = (total - free) - torch.cuda.memory_reserved(self.device)
        weights = torch.cuda.memory_allocated(self.device)
        return max(0, int(total * self.config.gpu_memory_utilization) - weights - self.activation_peak - non_torch)

    def capture_cuda_graphs(self) -> None:
        if self.device.type != "cuda" or self.config.enforce_eager:
            return
        self.graph_runner = CudaGraphRunner(self.model, self.backend, self.config.max_num_seqs, self.config.max_blocks_per_seq, self.device)
        self.graph_runner.capture()

    # ---- one step -----------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, block_tables: dict[str, list[int]]) -> ModelRunnerOutput:
        batch = _build_batch(sched, block_tables, self.block_size)
        meta = AttentionMetadata(
            num_reqs=len(sched.scheduled),
            num_decodes=batch.num_decodes,
            num_decode_tokens=batch.num_decodes,
            max_query_len=int(batch.query_lens.max()),
            max_seq_len=int(batch.seq_lens.max()),
            query_start_loc=self._to_device(batch.query_start_loc, torch.int32),
            seq_lens=self._to_device(batch.seq_lens, torch.int32),
            block_tables=self._to_device(batch.block_tables, torch.int32),
            slot_mapping=self._to_device(batch.slot_mapping, torch.int64),
            query_start_loc_cpu=batch.query_start_loc.tolist(),
            seq_lens_cpu=batch.seq_lens.tolist(),
        )
        input_ids = self._to_device(batch.input_ids, torch.int64)
        positions = self._to_device(batch.positions, torch.int64)
        if self.graph_runner is not None and meta.num_decodes == meta.num_reqs and self.graph_runner.can_run(meta.num_reqs):
            hidden = self.graph_runner.run(input_ids, positions, meta.slot_mapping, meta.seq_lens, meta.block_tables)
        else:
            with forward_context(self.backend, meta):
                hidden = self.model(input_ids, positions)

        out = ModelRunnerOutput()
        self._prompt_logprobs(sched, batch, hidden, out)
        if batch.sample_rows:
            rows = [r for r, _ in batch.sample_rows]
            requests = [sched.scheduled[r][0] for r in rows]
            last_tokens = torch.from_numpy(batch.query_start_loc[1:][rows] - 1).to(self.device)
            logits = self.model.compute_logits(hidden[last_tokens]).float()
            sampling = SamplingBatch.build(
                [r.params for r in requests], [r.generator for r in requests],
                [r.prompt_token_ids for r in requests], [r.output_token_ids for r in requests],
                self.vocab_size, self.device,
            )
            result = self.sampler(logits, sampling)
            token_ids = result.token_ids.tolist()
            for i, request in enumerate(requests):
                out.sampled_token_ids[request.request_id] = token_ids[i]
            if result.logprobs is not None:
                assert result.logprob_token_ids is not None and result.sampled_ranks is not None
                ids, values, ranks = result.logprob_token_ids.tolist(), result.logprobs.tolist(), result.sampled_ranks.tolist()
                for i, request in enumerate(requests):
                    if request.params.logprobs is not None:
                        out.logprobs[request.request_id] = _logprobs_dict(ids[i], values[i], ranks[i], request.params.logprobs)
        return out

    def _prompt_logprobs(self, sched: SchedulerOutput, batch: _Batch, hidden: torch.Tensor, out: ModelRunnerOutput) -> None:
        for row, (request, num_new) in enumerate(sched.scheduled):
            start = request.num_computed_tokens
            span = request.prompt_logprob_span(start, start + num_new)
            if not span:
                continue
            offset = int(batch.query_start_loc[row]) - start
            logits = self.model.compute_logits(hidden[offset + span.start : offset + span.stop]).float()
            targets = torch.tensor(request.prompt_token_ids[span.start + 1 : span.stop + 1], device=self.device)
            k = request.params.prompt_logprobs or 0
            ids, values, ranks = compute_topk_logprobs(logits, targets, k)
            ids_l, values_l, ranks_l = ids.tolist(), values.tolist(), ranks.tolist()
            out.prompt_logprobs[request.request_id] = [
                _logprobs_dict(ids_l[j], values_l[j], ranks_l[j], k) for j in range(len(span))
            ]

    def _to_device(self, array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.from_numpy(array).to(dtype)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor


def _logprobs_dict(ids: list[int], values: list[float], rank: int, k: int) -> LogprobsDict:
    """The chosen token (column 0, with its rank) plus the top-k, ranked 1..k."""
    result: LogprobsDict = {ids[0]: Logprob(values[0], rank)}
    for j in range(1, k + 1):
        result.setdefault(ids[j], Logprob(values[j], j))
    return result


@dataclass
class _Batch:
    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_start_loc: np.ndarray
    query_lens: np.ndarray
    seq_lens: np.ndarray
    block_tables: np.ndarray
    num_decodes: int
    sample_rows: list[tuple[int, Request]]  # rows whose last token is sampled this step


def _build_batch(sched: SchedulerOutput, block_tables: dict[str, list[int]], block_size: int) -> _Batch:
    n = len(sched.scheduled)
    query_lens = np.fromiter((k for _, k in sched.scheduled), dtype=np.int64, count=n)
    starts = np.fromiter((r.num_computed_tokens for r, _ in sched.scheduled), dtype=np.int64, count=n)
    seq_lens = starts + query_lens
    query_start_loc = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])
    tables = [block_tables[r.request_id] for r, _ in sched.scheduled]
    width = max(len(t) for t in tables)
    table_array = np.zeros((n, width), dtype=np.int64)
    for i, t in enumerate(tables):
        table_array[i, : len(t)] = t
    input_ids = np.empty(int(query_start_loc[-1]), dtype=np.int64)
    sample_rows = []
    for i, (request, k) in enumerate(sched.scheduled):
        s = int(starts[i])
        input_ids[query_start_loc[i] : query_start_loc[i + 1]] = request.all_token_ids[s : s + k]
        if s + k == request.num_tokens:
            sample_rows.append((i, request))
    # Positions and slots for every token, vectorised over the flat batch.
    row_of_token = np.repeat(np.arange(n), query_lens)
    positions = np.arange(len(input_ids)) - query_start_loc[row_of_token] + starts[row_of_token]
    slot_mapping = table_array[row_of_token, positions // block_size] * block_size + positions % block_size
    num_decodes = int((query_lens == 1).sum())  # the scheduler put them first
    return _Batch(input_ids, positions, slot_mapping, query_start_loc, query_lens, seq_lens, table_array, num_decodes, sample_rows)
