"""What one launched step hands back: sampled ids kept on the device (the next step may read a
token in flight from there) while their copy to the host completes; `result()` waits and returns lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pagedllm.engine.request import Request
from pagedllm.outputs import Logprob, LogprobsDict

# (request, k, ids [N, 1 + k], logprobs [N, 1 + k], ranks [N]) on the host
PromptLogprobs = tuple[Request, int, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class ModelRunnerOutput:
    """One step's results on the host, by sample row (the order of `StepHandle.requests`)."""

    sampled_token_ids: list[int]
    logprobs: list[LogprobsDict | None] | None = None  # None when no row asked
    prompt_logprobs: list[tuple[Request, list[LogprobsDict]]] = field(default_factory=list)
    pooled: list[tuple[Request, list[float]]] = field(default_factory=list)  # pooling requests finished this step


@dataclass
class StepHandle:
    """A launched step. Its sampled ids stay on the device, where the next step may read them,
    while their copy to the host is in flight; `result()` waits for the step and returns lists."""

    requests: list[Request]  # the rows that sample a token, in row order
    token_ids: torch.Tensor  # [S] int64 on the device
    host_token_ids: torch.Tensor  # [S] int64 on the host (pinned, filled asynchronously on CUDA)
    event: torch.cuda.Event | None
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # host (ids, values, ranks)
    prompt_logprobs: list[PromptLogprobs]
    pooled: list[tuple[Request, torch.Tensor]] = field(default_factory=list)  # (request, its vector on the device)
    kv_copies: Any = None  # BlockCopies the step made (host KV tier): its saves are readable once it has finished

    def result(self) -> ModelRunnerOutput:
        if self.event is not None:
            self.event.synchronize()
        out = ModelRunnerOutput(self.host_token_ids.tolist())
        if self.logprobs is not None:
            ids, values, ranks = (t.tolist() for t in self.logprobs)
            out.logprobs = [
                None if r.params.logprobs is None else _logprobs_dict(ids[i], values[i], ranks[i], r.params.logprobs)
                for i, r in enumerate(self.requests)
            ]
        out.pooled = [(request, vector.tolist()) for request, vector in self.pooled]
        for request, k, ids_t, values_t, ranks_t in self.prompt_logprobs:
            ids_l, values_l, ranks_l = ids_t.tolist(), values_t.tolist(), ranks_t.tolist()
            out.prompt_logprobs.append((request, [_logprobs_dict(ids_l[j], values_l[j], ranks_l[j], k) for j in range(len(ids_l))]))
        return out


def _logprobs_dict(ids: list[int], values: list[float], rank: int, k: int) -> LogprobsDict:
    """The chosen token (column 0, with its rank) plus the top-k, ranked 1..k."""
    result: LogprobsDict = {ids[0]: Logprob(values[0], rank)}
    for j in range(1, k + 1):
        result.setdefault(ids[j], Logprob(values[j], j))
    return result
