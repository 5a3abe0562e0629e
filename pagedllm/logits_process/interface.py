"""The batch-level logits processor interface, as vLLM v1 spells it (vllm.v1.sample.logits_processor).

A processor class is built once per engine, on the driver, as `Cls(vllm_config, device, is_pin_memory)` (here
`vllm_config` is pagedllm's EngineConfig). Every step that samples, before sampling:

1. `update_state(batch_update)` tells it how the step's rows differ from the previous step's: `None` when they are
   the same rows in the same order, else a `BatchUpdate` to apply in the order removed, added, moved. An added row
   brings its `SamplingParams` (per-request arguments in `params.extra_args`), its prompt token ids and its output
   token ids, a list that the engine keeps up to date in place: read it at `apply` time for the latest tokens.
2. `apply(logits)` gets the step's [rows, vocab] float32 logits (after logit_bias and min_tokens, before penalties,
   temperature and the top-k/top-p/min-p filters) and returns them edited, in place or as a new tensor; rows of
   requests that did not ask for anything must be left alone.

`is_argmax_invariant()` True says `apply` never changes a row's argmax (it only reshapes the distribution): such a
processor is skipped in steps whose rows are all greedy. `validate_params(params)` (a classmethod) rejects a request's
arguments with a ValueError when the request is added.

Rows are the sampled positions of the step: a request verifying k speculative drafts has k + 1 consecutive rows, the
one of its last token (whose output list is the request's own) and one per draft (output list: the request's outputs
plus the drafts before it, a list of that step only: such rows are added afresh every step).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from pagedllm.sampling_params import SamplingParams


class MoveDirectionality(enum.Enum):
    UNIDIRECTIONAL = enum.auto()  # (a, b): the row at a goes to b; a is left empty
    SWAP = enum.auto()  # (a, b): the rows at a and b trade places


RemovedRequest = int  # the index the row had
# (index, params, prompt token ids, output token ids: a live list, read it at apply time)
AddedRequest = tuple[int, "SamplingParams", "list[int] | None", "list[int]"]
MovedRequest = tuple[int, int, MoveDirectionality]


@dataclass(frozen=True)
class BatchUpdate:
    """How this step's rows differ from the previous step's; apply `removed`, then `added`, then `moved`. An added
    or moved row replaces whatever sits at its index."""

    batch_size: int  # rows this step
    removed: Sequence[RemovedRequest] = field(default_factory=tuple)
    added: Sequence[AddedRequest] = field(default_factory=tuple)
    moved: Sequence[MovedRequest] = field(default_factory=tuple)


class LogitsProcessor(ABC):
    """Base class of batch-level logits processors (any class with these methods is accepted)."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Raises ValueError if the request's arguments for this processor are invalid."""
        return None

    @abstractmethod
    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None: ...

    @abstractmethod
    def apply(self, logits: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def is_argmax_invariant(self) -> bool: ...

    @abstractmethod
    def update_state(self, batch_update: BatchUpdate | None) -> None: ...


T = TypeVar("T")


def process_dict_updates(
    state: dict[int, T], batch_update: BatchUpdate | None,
    new_state: Callable[[SamplingParams, list[int] | None, list[int]], T | None],
) -> bool:
    """Keeps a {row index: per-row state} dict in step with the batch: `new_state(params, prompt_ids, output_ids)`
    gives an added row's state (None: nothing to do for it). Returns whether the dict changed."""
    if batch_update is None:
        return False
    changed = False
    for index in batch_update.removed:
        changed |= state.pop(index, None) is not None
    for index, params, prompt_ids, output_ids in batch_update.added:
        value = new_state(params, prompt_ids, output_ids)
        if value is not None:
            state[index] = value
            changed = True
        elif state.pop(index, None) is not None:
            changed = True
    for a, b, direction in batch_update.moved:
        at_a, at_b = state.pop(a, None), state.pop(b, None)
        if at_a is not None:
            state[b] = at_a
        if direction is MoveDirectionality.SWAP and at_b is not None:
            state[a] = at_b
        changed |= at_a is not None or at_b is not None
    return changed
