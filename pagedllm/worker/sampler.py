"""Batched token sampler: one row of logits per request, each row with its own parameters.

Order follows vLLM v1: logprobs from the raw logits, then logit_bias -> min_tokens -> logits processors -> penalties ->
greedy argmax, or temperature -> min_p -> top_k -> top_p -> a draw. On CUDA, after the logit edits, if
any, on a float32 copy, two Triton kernels (pagedllm/kernels/sampling.py): one turns min_p, top_k and
top_p into a logit threshold per row (skipped when no row has them), one pass over the logits draws
each row by the Gumbel-max trick among the tokens at or above it, greedy rows included. Elsewhere (CPU,
or use_kernel=False) the torch path: softmax for min_p, a sort for top_p, and an inverse-CDF draw on
CPU (an exponential race on CUDA).
Everything per row is expressed as batched tensor ops built once per step in `SamplingBatch.build`;
the only Python loop in the hot path is one draw per seeded row, so that a seeded request's noise
depends on its own generator alone and never on the batch around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pagedllm.sampling_params import SamplingParams

_NEG_INF = float("-inf")
_MIN_ROWS_FOR_FLOAT32_FILTERS = 16


def to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One host->device copy; pinned so it can overlap with the forward pass on CUDA."""
    pin = device.type == "cuda"
    return torch.tensor(data, dtype=dtype, pin_memory=pin).to(device, non_blocking=pin)


def _stop_ids_to_mask(params: SamplingParams) -> set[int]:
    # With ignore_eos the EOS ids may be generated freely; only the user's stop ids stay masked.
    return set(params.stop_token_ids or []) if params.ignore_eos else set(params.all_stop_token_ids)


def _padded(rows: list[list[int]], pad: int) -> list[list[int]]:
    width = max((len(r) for r in rows), default=0) or 1
    return [r + [pad] * (width - len(r)) for r in rows]


@dataclass
class SamplingBatch:
    num_rows: int
    vocab_size: int
    # Fast path: every row greedy with nothing to apply, so sampling is argmax of the raw logits.
    all_greedy: bool
    # Largest `logprobs` asked in the batch; None when no row asks.
    max_num_logprobs: int | None = None
    # Set when some rows are greedy and others random: picks between the two results per row.
    greedy_mask: torch.Tensor | None = None  # [B] bool
    any_random: bool = False
    # Sampling filters, None when no random row needs them. Greedy rows hold neutral values.
    temperature: torch.Tensor | None = None  # [B, 1] float32
    min_p: torch.Tensor | None = None  # [B, 1] float32
    top_k: torch.Tensor | None = None  # [B] int64, 0 = no limit
    max_top_k: int = 0
    top_p: torch.Tensor | None = None  # [B, 1] float32
    # The kernels' per-row inputs, for every batch with random rows: 1 / temperature, the noise scale
    # (1 random, 0 greedy) and, when any row filters, (top_k [B] int32, top_p [B], min_p [B]) with neutral values.
    inv_temperature: torch.Tensor | None = None  # [B] float32
    noise_scale: torch.Tensor | None = None  # [B] float32
    kernel_filters: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # Seeded random rows: row index -> the request's own generator.
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    # Sparse (row, token) lists, so nothing of size [B, V] is built for them.
    bias_index: tuple[torch.Tensor, torch.Tensor] | None = None
    bias_values: torch.Tensor | None = None
    stop_index: tuple[torch.Tensor, torch.Tensor] | None = None
    # Penalties, only for the P rows that use them.
    penalty_rows: torch.Tensor | None = None  # [P] int64
    repetition_penalty: torch.Tensor | None = None  # [P, 1]
    frequency_penalty: torch.Tensor | None = None  # [P, 1]
    presence_penalty: torch.Tensor | None = None  # [P, 1]
    seen_mask: torch.Tensor | None = None  # [P, V] bool: token in prompt or output
    output_counts: torch.Tensor | None = None  # [P, V] float32: occurrences in output
    # The step's logits processors (pagedllm/logits_process/, already told of the rows): `apply(logits, any_random)`
    # on the float32 copy, after logit_bias and min_tokens, before penalties. Set by the runner (all_greedy False).
    logits_processors: Any = None

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        vocab_size: int,
        device: torch.device,
        num_output_tokens: list[int] | None = None,
    ) -> SamplingBatch:
        """`num_output_tokens`: tokens each row has generated before this one, when that is more than
        `output_token_ids` holds (async scheduling: a token still in flight); for min_tokens."""
        num_rows = len(params)
        if num_output_tokens is None:
            num_output_tokens = [len(ids) for ids in output_token_ids]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        max_num_logprobs = max(asked) if asked else None

        bias = [(i, t, v) for i, p in enumerate(params) for t, v in (p.logit_bias or {}).items()]
        stops = [
            (i, t)
            for i, p in enumerate(params)
            if num_output_tokens[i] < p.min_tokens
            for t in sorted(_stop_ids_to_mask(p))
        ]
        penalized = [i for i, p in enumerate(params) if p.needs_penalties]
        greedy = [p.greedy for p in params]
        if all(greedy) and not bias and not stops and not penalized:
            return cls(num_rows, vocab_size, all_greedy=True, max_num_logprobs=max_num_logprobs)

        batch = cls(num_rows, vocab_size, all_greedy=False, max_num_logprobs=max_num_logprobs)
        batch.any_random = not all(greedy)
        if any(greedy) and batch.any_random:
            batch.greedy_mask = to_device(greedy, torch.bool, device)
        if bias:
            rows, cols, values = zip(*bias)
            batch.bias_index = (to_device(list(rows), torch.int64, device), to_device(list(cols), torch.int64, device))
            batch.bias_values = to_device(list(values), torch.float32, device)
        if stops:
            rows, cols = zip(*stops)
            batch.stop_index = (to_device(list(rows), torch.int64, device), to_device(list(cols), torch.int64, device))
        if penalized:
            batch._build_penalties(params, penalized, prompt_token_ids, output_token_ids, device)
        if batch.any_random:
            batch._build_filters(params, greedy, generators, device)
        return batch

    def _build_penalties(
        self,
        params: list[SamplingParams],
        rows: list[int],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        device: torch.device,
    ) -> None:
        vocab = self.vocab_size

        def column(name: str) -> torch.Tensor:
            return to_device([[getattr(params[i], name)] for i in rows], torch.float32, device)

        self.penalty_rows = to_device(rows, torch.int64, device)
        self.repetition_penalty = column("repetition_penalty")
        self.frequency_penalty = column("frequency_penalty")
        self.presence_penalty = column("presence_penalty")
        # Padding goes to an extra column `vocab` that is dropped afterwards.
        outputs = to_device(_padded([output_token_ids[i] for i in rows], vocab), torch.int64, device)
        prompts = to_device(_padded([prompt_token_ids[i] for i in rows], vocab), torch.int64, device)
        counts = torch.zeros(len(rows), vocab + 1, dtype=torch.float32, device=device)
        counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=torch.float32))
        seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, prompts, True)
        self.output_counts = counts[:, :vocab]
        self.seen_mask = seen[:, :vocab] | (self.output_counts > 0)

    def _build_filters(
        self,
        params: list[SamplingParams],
        greedy: list[bool],
        generators: list[torch.Generator | None],
        device: torch.device,
    ) -> None:
        # Greedy rows get neutral values: their token is taken before these filters anyway.
        rows = list(zip(params, greedy))
        temps = [1.0 if g else p.temperature for p, g in rows]
        min_p = [0.0 if g else p.min_p for p, g in rows]
        # top_k >= vocab is no limit, stored as 0 so it never forces a full-vocab topk.
        ks = [0 if g or p.top_k >= self.vocab_size else p.top_k for p, g in rows]
        top_p = [1.0 if g else p.top_p for p, g in rows]
        # The torch path's inputs, each only when some row needs it.
        if any(t != 1.0 for t in temps):
            self.temperature = to_device([[t] for t in temps], torch.float32, device)
        if any(min_p):
            self.min_p = to_device([[m] for m in min_p], torch.float32, device)
        if any(ks):
            self.top_k = to_device(ks, torch.int64, device)
            self.max_top_k = max(ks)
        if any(p < 1.0 for p in top_p):
            self.top_p = to_device([[p] for p in top_p], torch.float32, device)
        self.generators = {i: gen for i, (gen, g) in enumerate(zip(generators, greedy)) if gen is not None and not g}
        # The kernels' inputs, the filters only when some row has one.
        self.inv_temperature = to_device([1.0 / t for t in temps], torch.float32, device)
        self.noise_scale = to_device([0.0 if g else 1.0 for g in greedy], torch.float32, device)
        if self.min_p is not None or self.top_k is not None or self.top_p is not None:
            self.kernel_filters = (to_device(ks, torch.int32, device), to_device(top_p, torch.float32, device),
                                   to_device(min_p, torch.float32, device))


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprob_token_ids: torch.Tensor | None  # [B, 1 + K] int64: the sampled token, then the top-K
    logprobs: torch.Tensor | None  # [B, 1 + K] float32, matching
    sampled_ranks: torch.Tensor | None  # [B] int64, 1 = most likely


def compute_topk_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax in float32 of raw logits; returns (ids [N,1+k], logprobs [N,1+k], ranks [N]) with column 0 = token_ids. Also used for prompt logprobs."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_ids = token_ids.to(torch.int64).view(-1, 1)
    token_logprobs = logprobs.gather(1, token_ids)
    # Same convention as vLLM: tokens at least as likely as the chosen one, itself included.
    ranks = (logprobs >= token_logprobs).sum(dim=-1)
    if k == 0:
        return token_ids, token_logprobs, ranks
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)
    return torch.cat([token_ids, top_ids], dim=1), torch.cat([token_logprobs, top_logprobs], dim=1), ranks


class Sampler:
    def __init__(self, use_kernel: bool | None = None) -> None:
        """use_kernel: draw random batches with the Triton kernels; None = on CUDA."""
        self.use_kernel = use_kernel

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        # A padded LM head may emit columns past the tokenizer's vocabulary; they are never sampled.
        logits = logits[:, : batch.vocab_size]
        if batch.all_greedy:
            token_ids = self._argmax(logits)
        else:
            token_ids = self._sample(logits, batch)
        if batch.max_num_logprobs is None:
            return SamplerOutput(token_ids, None, None, None)
        ids, logprobs, ranks = compute_topk_logprobs(logits, token_ids, batch.max_num_logprobs)
        return SamplerOutput(token_ids, ids, logprobs, ranks)

    def _kernels_for(self, logits: torch.Tensor) -> bool:
        return logits.is_cuda if self.use_kernel is None else self.use_kernel

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        if self._kernels_for(logits):
            from pagedllm.kernels.sampling import greedy_argmax

            return greedy_argmax(logits)
        return logits.argmax(dim=-1)

    def _sample(self, raw: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        edits = (batch.bias_index is not None or batch.stop_index is not None or batch.penalty_rows is not None
                 or batch.logits_processors is not None)
        use_kernel = self._kernels_for(raw) and batch.any_random
        if use_kernel and not edits:
            return _kernel_draw(raw, batch)  # reads the raw logits in their own dtype
        logits = _edited(raw, batch)
        if not batch.any_random:
            return self._argmax(logits)
        # The filters' search runs one program per row, and on float32 rows it takes ~12 passes: for a lone
        # row the torch sort is faster (0.38 vs 0.64 ms at 1 x 151,936 on an H200; the kernel 2.1x faster at 256 rows).
        if use_kernel and (batch.kernel_filters is None or batch.num_rows >= _MIN_ROWS_FOR_FLOAT32_FILTERS):
            return _kernel_draw(logits, batch)
        greedy_ids = logits.argmax(dim=-1) if batch.greedy_mask is not None else None
        sampled = _sample_random(logits, batch)
        return sampled if greedy_ids is None else torch.where(batch.greedy_mask, greedy_ids, sampled)


def _edited(raw: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logit_bias, min_tokens, logits processors, penalties on a float32 copy: the raw logits stay intact for logprobs
    and the caller."""
    logits = raw.to(dtype=torch.float32, copy=True)
    if batch.bias_index is not None:
        logits.index_put_(batch.bias_index, batch.bias_values, accumulate=True)
    if batch.stop_index is not None:
        logits[batch.stop_index] = _NEG_INF
    if batch.logits_processors is not None:
        logits = batch.logits_processors.apply(logits, batch.any_random)
    if batch.penalty_rows is not None:
        _apply_penalties(logits, batch)
    return logits


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    rows = logits[batch.penalty_rows]
    # Repetition penalty as in transformers: pushes seen tokens toward "less likely" whatever the sign.
    penalty = torch.where(batch.seen_mask, batch.repetition_penalty, 1.0)
    rows = torch.where(rows > 0, rows / penalty, rows * penalty)
    rows -= batch.frequency_penalty * batch.output_counts
    rows -= batch.presence_penalty * (batch.output_counts > 0)
    logits[batch.penalty_rows] = rows


def _sample_random(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    probs = _filtered(logits, batch).softmax(dim=-1)
    if not probs.is_cuda:
        return _inverse_cdf_draw(probs, batch.generators)
    return probs.div_(_exponential_noise(probs, batch.generators)).argmax(dim=-1)


def _filtered(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, then min_p, top_k, top_p as -inf (in place where it can)."""
    if batch.temperature is not None:
        logits.div_(batch.temperature)
    if batch.min_p is not None:
        probs = logits.softmax(dim=-1)
        too_unlikely = probs < batch.min_p * probs.amax(dim=-1, keepdim=True)
        logits.masked_fill_(too_unlikely, _NEG_INF)
    if batch.top_p is not None:
        logits = _apply_top_k_top_p(logits, batch.top_k, batch.top_p)
    elif batch.top_k is not None:
        logits = _apply_top_k(logits, batch.top_k, batch.max_top_k)
    return logits


def _kernel_draw(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The filters' thresholds, then every row drawn in one kernel pass; each row's Philox seed is fresh
    per step (from torch's default generator), a seeded row's from its own generator."""
    from pagedllm.kernels.sampling import filter_thresholds, gumbel_max_sample

    assert batch.inv_temperature is not None and batch.noise_scale is not None
    base = int(torch.randint(1 << 62, (1,)))
    seeds = torch.arange(base, base + batch.num_rows, dtype=torch.int64, device=logits.device)
    if batch.generators:
        rows = list(batch.generators)
        drawn = [torch.randint(1 << 62, (1,), generator=g, device=g.device) for g in batch.generators.values()]
        seeds[to_device(rows, torch.int64, logits.device)] = torch.cat(drawn).to(logits.device)
    thresholds = None
    if batch.kernel_filters is not None:
        thresholds = filter_thresholds(logits, batch.inv_temperature, *batch.kernel_filters)
    return gumbel_max_sample(logits, batch.inv_temperature, batch.noise_scale, seeds, thresholds)


def _top_k_threshold(sorted_desc: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """[B, 1] logit of each row's k-th best token (ties with it are kept); -inf for rows without a limit."""
    kth = sorted_desc.gather(1, (top_k - 1).clamp(min=0).view(-1, 1))
    return kth.masked_fill((top_k == 0).view(-1, 1), _NEG_INF)


def _apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    # topk(max_k) rather than a full sort: only the k best values are needed.
    best = logits.topk(max_top_k, dim=-1).values
    return logits.masked_fill_(logits < _top_k_threshold(best, top_k), _NEG_INF)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        sorted_logits.masked_fill_(sorted_logits < _top_k_threshold(sorted_logits, top_k), _NEG_INF)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # exactly 0 for the best token, which is always kept
    # Rows with top_p = 1 are left alone: rounding could push mass_before to 1.0 in the far tail.
    drop = (mass_before >= top_p) & (top_p < 1.0)
    sorted_logits.masked_fill_(drop, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _inverse_cdf_draw(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One uniform per row against the running sum of probs: on CPU, drawing an exponential for
    every vocabulary entry (the race below) costs more than the rest of sampling together."""
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64)
    for row, generator in generators.items():
        u[row] = torch.rand(1, dtype=torch.float64, generator=generator)
    cdf = probs.double().cumsum_(dim=-1)
    # right=True: a token of zero probability has the same cdf as its predecessor and is never chosen.
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max_(probs.shape[-1] - 1).view(-1)


def _exponential_noise(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """q ~ Exponential(1) per token: argmax(probs / q) is then a draw from probs."""
    q = torch.empty_like(probs).exponential_()
    # A seeded row draws a full row from its own generator, so its noise ignores the batch around it.
    for row, generator in generators.items():
        q[row] = torch.empty_like(probs[row]).exponential_(generator=generator)
    # A q of exactly 0 would give 0/0 = NaN on masked tokens, and argmax picks NaN.
    return q.clamp_min_(torch.finfo(q.dtype).tiny)
