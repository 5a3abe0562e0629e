"""Prompt lookup: a request's last n tokens (n from prompt_lookup_max down to prompt_lookup_min), found earlier in its
prompt and output, propose the k tokens that followed them there (the latest such occurrence). Free to run and right
often for outputs that copy their input (code edits, summaries, extraction)."""

from __future__ import annotations

from typing import Any

import numpy as np


class NgramProposer:
    def __init__(self, num_tokens: int, min_n: int, max_n: int) -> None:
        self.k, self.min_n, self.max_n = num_tokens, min_n, max_n

    def propose_batch(self, batch: list[tuple[Any, int]], running: list[Any]) -> list[list[int]]:
        """Drafts for (request, how many at most) pairs (`running`: every running request; unused here)."""
        return [self.propose(request.all_token_ids, k) for request, k in batch]

    def retain(self, request_ids: set[str]) -> None:
        """Keeps no per-request state."""

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to k (<= the configured count) tokens, [] when no suffix recurs."""
        k = min(k, self.k)
        if k < 1 or len(token_ids) < self.min_n + 1:
            return []
        ids = np.asarray(token_ids[-4096:], dtype=np.int64)  # a bounded window: the cost stays flat on long outputs
        length = len(ids)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            suffix = ids[length - n :]
            # windows of n tokens that end before the suffix starts its own last token
            windows = np.lib.stride_tricks.sliding_window_view(ids[: length - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # the tokens that followed the latest earlier occurrence
                return ids[start : start + k].tolist()
        return []
