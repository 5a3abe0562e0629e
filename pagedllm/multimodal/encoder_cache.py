"""The vision encoder's outputs, kept per image (by content hash) so that chunked prefill, preemption and requests
showing the same image encode it once.

The scheduler owns the bookkeeping (`EncoderCachePlanner`): for each prompt chunk it schedules, every image whose
placeholders the chunk meets must have its embeddings by the forward, so images not cached yet are encoded in that
step, under an encoder budget (rows per step) and the cache's capacity (rows); an image that does not fit cuts the
chunk just before it. It evicts least recently used entries that the step does not need, and tells the runner what to
encode and what to drop (`EncoderWork`). The runner (`EncoderCache`) holds the tensors and obeys.

Where an image's tokens attend to each other both ways (Gemma 3, `whole_images`), a query cannot see keys of a later
step, so an image's tokens not yet computed run in one step: a chunk stops before an image it cannot hold whole, and a
chunk that starts inside one (a prefix-cache hit ending mid-image) runs to the image's end or not at all this step.
prepare_prompt refuses such an image longer than a step's token budget."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from pagedllm.multimodal.inputs import ImageItem, MultiModalState


@dataclass
class EncoderWork:
    run: list[ImageItem] = field(default_factory=list)  # encode these before the forward
    drop: list[bytes] = field(default_factory=list)  # evicted entries (before the new ones are stored)


def encoder_cache_rows(config: Any) -> int:
    """The encoder cache's capacity in rows: twice a step's token budget, and at least 16384 (a large image's
    embeddings, several times over)."""
    return max(2 * config.max_num_batched_tokens, 16384)


class EncoderCachePlanner:
    def __init__(self, budget: int, capacity: int, whole_images: bool = False) -> None:
        """budget: rows the encoder may produce per step; capacity: rows the cache holds (at least one image's);
        whole_images: an image's remaining tokens run in one step."""
        self.budget, self.capacity, self.whole_images = budget, capacity, whole_images
        self.entries: OrderedDict[bytes, int] = OrderedDict()  # hash -> rows, least recently used first
        self.used = 0
        self._step_budget = budget
        self._needed: set[bytes] = set()
        self._work = EncoderWork()
        # Images looked up as a chunk first reaches them, and those found cached (vLLM's mm_cache_queries / hits).
        self.queries = self.hits = 0

    def fit(self, state: MultiModalState, start: int, num_new: int) -> int:
        """How many of tokens [start, start + num_new) may run this step: all, or up to the first image whose
        embeddings can be neither found nor made now, or (whole_images) that the chunk would cut (0: none)."""
        for item in state.overlapping(start, start + num_new):
            if self.whole_images and item.end > start + num_new:
                return max(0, item.offset - start)  # a chunk from inside the image (offset < start) runs nothing
            first_look = item.offset >= start
            if item.hash in self.entries:
                self.entries.move_to_end(item.hash)
                self._needed.add(item.hash)
                self.queries += first_look
                self.hits += first_look
                continue
            # An image larger than the budget may run alone: as the step's first encoder work.
            over = item.length > self._step_budget and self._step_budget < self.budget
            if over or not self._make_room(item.length):
                return max(0, item.offset - start)
            self.entries[item.hash] = item.length
            self.used += item.length
            self._step_budget -= item.length
            self._needed.add(item.hash)
            self._work.run.append(item)
            self.queries += first_look
        return num_new

    def _make_room(self, rows: int) -> bool:
        if self.used + rows <= self.capacity:
            return True
        victims, freed = [], 0
        for key, size in self.entries.items():  # oldest first, skipping what this step reads
            if key not in self._needed:
                victims.append(key)
                freed += size
                if self.used - freed + rows <= self.capacity:
                    break
        if self.used - freed + rows > self.capacity:
            return False
        for key in victims:
            self.used -= self.entries.pop(key)
            self._work.drop.append(key)
        return True

    def take_work(self) -> EncoderWork | None:
        """The step's work (None if none), and a fresh budget for the next step."""
        work, self._work = self._work, EncoderWork()
        self.end_step()
        return work if work.run or work.drop else None

    def end_step(self) -> None:
        """A fresh budget; work planned for a step that launched nothing stays for the next one."""
        self._needed.clear()
        self._step_budget = self.budget


class EncoderCache:
    """The runner's side: image hash -> embeddings [rows, hidden] on the device."""

    def __init__(self) -> None:
        self.tensors: dict[bytes, torch.Tensor] = {}

    def apply(self, work: EncoderWork, encode: Callable[[list[ImageItem]], list[torch.Tensor]]) -> None:
        for key in work.drop:
            self.tensors.pop(key, None)
        if work.run:
            for item, rows in zip(work.run, encode(work.run)):
                assert rows.shape[0] == item.length, f"the encoder gave {rows.shape[0]} rows for {item.length} tokens"
                self.tensors[item.hash] = rows
