"""One step's grammar bitmask: a row per sampled row of the batch, filled for the constrained ones only, applied to
the logits on the device before sampling (disallowed tokens -> -inf). Built only for steps with constrained rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GrammarBitmask:
    bitmask: torch.Tensor  # [num_sample_rows, ceil(vocab / 32)] int32 (host); rows not in `rows` are unused
    rows: list[int]  # the constrained sample rows
    vocab_size: int

    def apply(self, logits: torch.Tensor) -> None:
        """In place on the logits of the step's sampled rows (after any CUDA graph: the logits are computed outside)."""
        import xgrammar as xgr

        bitmask = self.bitmask
        if bitmask.device != logits.device:
            bitmask = bitmask.to(logits.device, non_blocking=bitmask.is_pinned())
        indices = None if len(self.rows) == logits.shape[0] else self.rows
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=min(self.vocab_size, logits.shape[-1]), indices=indices)
