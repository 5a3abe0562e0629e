"""The runner's side of logits processors: loading them, and each step telling them how the sampled rows changed.

The rows of a step are `requests` in sample-row order (a request verifying drafts has consecutive rows). A row's
identity is its request for the request's first row, and a fresh one per step for a draft row. The step's rows are
diffed against the previous step's: equal lists give `update_state(None)` (steady decode), else one BatchUpdate with
the rows gone, the new ones, and moves for those that changed place (a request leaving the middle of the batch shifts
the rows after it: a chain of moves; a new row whose place is still taken is added at a free index and moved).

With async scheduling a request may have a token in flight at sampling time (sampled by the previous step, not yet in
`output_token_ids`). Processors must see it, so then each row's output list is a mirror the runner owns, updated in
place every step: the request's outputs plus the tokens in flight, read from the previous step's sampled ids (which
waits for that step, as vLLM does). Without async scheduling the list is the request's own `output_token_ids`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from pagedllm.logits_process.builtin import BUILTIN_LOGITS_PROCESSORS
from pagedllm.logits_process.interface import BatchUpdate, MoveDirectionality
from pagedllm.sampling_params import SamplingParams

_METHODS = ("apply", "update_state", "is_argmax_invariant")


def resolve_logits_processor(spec: Any) -> type:
    """A processor class, or its name as "package.module:Class" or "package.module.Class"."""
    if isinstance(spec, str):
        module_name, sep, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
        if not module_name or not attr:
            raise ValueError(f"logits processor {spec!r}: expected 'module:Class' or 'module.Class'.")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"logits processor {spec!r}: cannot import {module_name!r} ({error}).") from None
        cls = getattr(module, attr, None)
        if cls is None:
            raise ValueError(f"logits processor {spec!r}: {module_name} has no attribute {attr!r}.")
        spec = cls
    if not isinstance(spec, type) or any(not callable(getattr(spec, m, None)) for m in _METHODS):
        raise ValueError(f"logits processor {spec!r} must be a class with {', '.join(_METHODS)} "
                         "(see pagedllm.logits_process.LogitsProcessor).")
    return spec


def resolve_logits_processors(specs: Any) -> list[type] | None:
    """EngineConfig.logits_processors: None, a list of classes or names, or names in one comma-separated string."""
    if specs is None:
        return None
    if isinstance(specs, (str, type)):
        specs = [s.strip() for s in specs.split(",") if s.strip()] if isinstance(specs, str) else [specs]
    return [resolve_logits_processor(s) for s in specs] or None


def validate_params(classes: Iterable[type] | None, params: SamplingParams) -> None:
    """Every processor's `validate_params` on a request's params (built-in ones included); ValueError if one objects.
    For the engine's add_request, after `params.update_from_tokenizer(tokenizer)`."""
    for cls in [*BUILTIN_LOGITS_PROCESSORS, *(classes or ())]:
        check = getattr(cls, "validate_params", None)
        if check is not None:
            check(params)


def wants_builtin(params: Any) -> bool:
    """Whether a request asks for a built-in processor (allowed_token_ids, bad words)."""
    return bool(params.allowed_token_ids or params.bad_words_token_ids or params.bad_words_tokenized)


class _DraftRow:
    """The identity of a draft's row: new every step, so such rows are always added afresh."""

    __slots__ = ("request", "j")

    def __init__(self, request: Any, j: int) -> None:
        self.request, self.j = request, j


class _Mirror:
    """A request's output ids plus its tokens in flight (async scheduling); `synced` leading ids are confirmed."""

    __slots__ = ("tokens", "synced")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.synced = 0


Moves = list[tuple[int, int, MoveDirectionality]]


def diff_rows(old: Sequence[Any], new: Sequence[Any]) -> tuple[list[int], list[tuple[int, int]], Moves]:
    """What takes the rows `old` to `new` (keys compared by identity), in BatchUpdate's order: the old indices
    removed, the rows added as (index added at, index in `new`), then the moves. A new row whose index still holds
    a row that must move away is added at a free index and moved into place with the others."""
    where = {key: i for i, key in enumerate(old)}
    moves: dict[int, int] = {}  # index now -> index in `new`, for the rows out of place
    occupied: set[int] = set()  # indices holding a row that stays
    new_rows: list[int] = []
    for k, key in enumerate(new):
        i = where.pop(key, None)
        if i is None:
            new_rows.append(k)
        else:
            occupied.add(i)
            if i != k:
                moves[i] = k
    removed = sorted(where.values())
    added: list[tuple[int, int]] = []
    blocked: list[int] = []
    for k in new_rows:
        if k in occupied:
            blocked.append(k)
        else:
            occupied.add(k)
            added.append((k, k))
    free = (i for i in range(max(len(old), len(new))) if i not in occupied)
    for k in blocked:  # there are at least as many free indices as new rows
        i = next(free)
        added.append((i, k))
        moves[i] = k
    # The moves form chains that end at a free index (applied from that end) and cycles (swaps with their start).
    ordered: Moves = []
    targets = set(moves.values())
    done: set[int] = set()
    for head in moves:
        if head in targets:
            continue
        chain = [head]
        while chain[-1] in moves:
            chain.append(moves[chain[-1]])
        done.update(chain[:-1])
        for i in range(len(chain) - 2, -1, -1):
            ordered.append((chain[i], chain[i + 1], MoveDirectionality.UNIDIRECTIONAL))
    for start in moves:
        if start in done:
            continue
        done.add(start)
        node = moves[start]
        while node != start:
            ordered.append((start, node, MoveDirectionality.SWAP))
            done.add(node)
            node = moves[node]
    return removed, added, ordered


class LogitsProcessors:
    """The engine's processors (built-in, then custom ones) on the driver, with the rows they were last told of."""

    def __init__(self, config: Any, device: torch.device, classes: Iterable[type] | None = None,
                 track_pending: bool = False) -> None:
        pin = device.type == "cuda"
        self.custom = [cls(config, device, pin) for cls in classes or ()]
        builtin = [cls(config, device, pin) for cls in BUILTIN_LOGITS_PROCESSORS]
        self.processors = [(p, bool(p.is_argmax_invariant())) for p in [*builtin, *self.custom]]
        self.track_pending = track_pending
        self._keys: list[Any] = []
        self._mirrors: dict[Any, _Mirror] = {}

    def prepare(self, requests: Sequence[Any], pending_ids: Callable[[], list[int]] | None = None,
                builtin: bool | None = None) -> bool:
        """Tells every processor how this step's rows differ from the last; False (and nothing called) when no
        processor has work: none registered and no row asks for a built-in one. `pending_ids()`: the previous
        step's sampled ids on the host, read only when a row has a token in flight. `builtin`: whether any
        unfinished request asks for a built-in processor, as the engine counts them (None: look at the rows)."""
        if builtin is None:
            builtin = any(wants_builtin(r.params) for r in requests)
        if not self.custom and not builtin:
            if self._keys:  # the processors forget the rows they held
                self._update(BatchUpdate(len(requests), removed=range(len(self._keys))))
                self._keys, self._mirrors = [], {}
            return False
        keys: list[Any] = []
        previous = None
        j = 0
        for r in requests:
            j = j + 1 if r is previous else 0
            previous = r
            keys.append(r if j == 0 else _DraftRow(r, j))
        if self.track_pending:
            self._sync_mirrors(keys, pending_ids)
        if keys == self._keys:
            self._update(None)
            return True
        removed, added, moved = diff_rows(self._keys, keys)
        if self.track_pending:
            for index in removed:
                key = self._keys[index]
                if not isinstance(key, _DraftRow):
                    self._mirrors.pop(key, None)
        entries = []
        for index, k in added:
            key = keys[k]
            r = key.request if isinstance(key, _DraftRow) else key
            output = self._mirrors[r].tokens if self.track_pending else r.output_token_ids
            if isinstance(key, _DraftRow):
                output = output + r.spec_token_ids[: key.j]
            entries.append((index, r.params, r.prompt_token_ids, output))
        self._keys = keys
        self._update(BatchUpdate(len(keys), removed, entries, moved))
        return True

    def apply(self, logits: torch.Tensor, any_random: bool) -> torch.Tensor:
        """Every processor on the step's float32 logits; argmax-invariant ones only when some row samples randomly."""
        for processor, invariant in self.processors:
            if any_random or not invariant:
                logits = processor.apply(logits)
        return logits

    def _update(self, batch_update: BatchUpdate | None) -> None:
        for processor, _ in self.processors:
            processor.update_state(batch_update)

    def _sync_mirrors(self, keys: list[Any], pending_ids: Callable[[], list[int]] | None) -> None:
        pending: list[int] | None = None
        for key in keys:
            if isinstance(key, _DraftRow):
                continue
            mirror = self._mirrors.get(key)
            if mirror is None:
                mirror = self._mirrors[key] = _Mirror()
            out = key.output_token_ids
            n = len(out)
            if mirror.synced == n and len(mirror.tokens) == n + key.num_pending:
                continue
            del mirror.tokens[mirror.synced:]
            mirror.tokens.extend(out[mirror.synced:])
            mirror.synced = n
            if key.num_pending:
                assert key.num_pending == 1 and pending_ids is not None, "a token in flight is the previous step's"
                if pending is None:
                    pending = pending_ids()
                mirror.tokens.append(pending[key.pending_row])
