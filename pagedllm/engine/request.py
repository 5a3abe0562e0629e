"""One sequence's state as it moves through the engine: waiting -> running (-> preempted -> waiting) -> finished."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pagedllm.outputs import LogprobsDict, RequestMetrics
from pagedllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    def __init__(self, value: str) -> None:
        # A plain attribute, not a property: it is read for every request at every step.
        self.finished = value in ("stop", "length", "abort")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: never None
    generator: torch.Generator | None = None  # the request's own RNG when it has a seed
    parent_id: str | None = None  # set for the samples of an n > 1 request
    index: int = 0  # which of the parent's samples this is
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    # Tokens sampled by a step still in flight (async scheduling), not yet in all_token_ids; the
    # scheduler counts them, and the next step reads such a token on the device (row `pending_row`
    # of that step's sampled ids).
    num_pending: int = 0
    pending_row: int = 0
    spec_token_ids: list[int] = field(default_factory=list)  # draft tokens the next step verifies (spec_decode/)
    plain_greedy: bool = field(init=False, default=False)
    num_preemptions: int = 0
    cache_salt: str | None = None  # mixed into the first block's hash: only requests with the same salt share blocks
    lora_request: Any = None  # LoRARequest: the adapter it runs with (its id is mixed into the hashes too)
    pooling: Any = None  # PoolingState: a pooling request's vector in the making (it samples nothing)
    token_type_ids: list[int] | None = None  # an encoder's segment of each prompt token (a cross-encoder's pair)
    mm: Any = None  # MultiModalState: its images' placeholder spans, hashes and encoder inputs (multimodal/)
    kv_transfer_pending: bool = False  # its prompt's blocks are being pulled from another engine (kv_transfer/)
    priority: int = 0  # scheduling_policy="priority": lower runs first
    queue_key: tuple[int, int] = (0, 0)  # its place in a priority queue (core/queues.py)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of the full blocks, extended as tokens come
    num_cached_tokens: int | None = None  # prefix-cache hit at first admission
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[LogprobsDict] | None = None
    prompt_logprobs: list[LogprobsDict | None] | None = None
    detokenizer: Any = None
    structured_output: Any = None  # StructuredOutputRequest: the sample's grammar and matcher, when constrained
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.time()))

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        # Sampling is argmax of the raw logits: lets the runner skip building a sampling batch.
        p = self.params
        self.plain_greedy = p.greedy and not p.logit_bias and not p.needs_penalties and p.logprobs is None and p.min_tokens == 0
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has no logprob

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def prompt_logprob_span(self, start: int, end: int) -> range:
        """Positions in [start, end) whose logits give a prompt token's logprob not yet recorded
        (position p predicts prompt token p + 1; a preempted request does not redo them)."""
        if self.params.prompt_logprobs is None:
            return range(0)
        done = len(self.prompt_logprobs or [None]) - 1
        return range(max(start, done), min(end, self.num_prompt_tokens - 1))

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
