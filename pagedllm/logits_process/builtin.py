"""Built-in processors on the batch interface: allowed_token_ids (every other token masked) and bad words (a word's
last token masked where the output ends with the tokens before it). Both cost nothing in steps without such rows:
the runner only engages the processors when some row asks for one of them (or a custom processor is registered)."""

from __future__ import annotations

from typing import Any

import torch

from pagedllm.logits_process.interface import BatchUpdate, LogitsProcessor, process_dict_updates
from pagedllm.sampling_params import SamplingParams

_NEG_INF = float("-inf")


def _to_device(data: list[int], device: torch.device, pin: bool) -> torch.Tensor:
    return torch.tensor(data, dtype=torch.int64, pin_memory=pin).to(device, non_blocking=pin)


class AllowedTokenIdsLogitsProcessor(LogitsProcessor):
    """`SamplingParams.allowed_token_ids`: the row may only sample those tokens. The [rows, vocab] mask is rebuilt
    when the rows that ask change, and reused while they stay."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.device, self.pin = device, is_pin_memory
        self.allowed: dict[int, list[int]] = {}
        self._mask: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows [R], banned [R, V] bool)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if process_dict_updates(self.allowed, batch_update, lambda params, _, __: params.allowed_token_ids or None):
            self._mask = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.allowed:
            return logits
        vocab = logits.shape[-1]
        if self._mask is None or self._mask[1].shape[1] != vocab:
            rows = sorted(self.allowed)
            mask_rows = [i for i, row in enumerate(rows) for _ in self.allowed[row]]
            mask_cols = [t for row in rows for t in self.allowed[row]]
            banned = torch.ones(len(rows), vocab, dtype=torch.bool, device=self.device)
            banned[_to_device(mask_rows, self.device, self.pin), _to_device(mask_cols, self.device, self.pin)] = False
            self._mask = (_to_device(rows, self.device, self.pin), banned)
        rows_t, banned = self._mask
        if rows_t.numel() == logits.shape[0]:  # every row asks: no gather
            return logits.masked_fill_(banned, _NEG_INF)
        logits.index_copy_(0, rows_t, logits.index_select(0, rows_t).masked_fill_(banned, _NEG_INF))
        return logits


class BadWordsLogitsProcessor(LogitsProcessor):
    """Bad words as token sequences (`SamplingParams.all_bad_words_token_ids`): a one-token word is never sampled; a
    longer one's last token is masked while the output so far ends with the rest of the word."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.device, self.pin = device, is_pin_memory
        self.words: dict[int, tuple[list[list[int]], list[int]]] = {}  # row -> (words, live output ids)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        if sampling_params.bad_words and sampling_params.bad_words_tokenized is None:
            raise ValueError("bad_words must be tokenized before the request runs (SamplingParams."
                             "update_from_tokenizer); an engine without a tokenizer takes bad_words_token_ids.")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.words, batch_update,
                             lambda params, _, output: (params.all_bad_words_token_ids, output)
                             if params.all_bad_words_token_ids else None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.words:
            return logits
        rows: list[int] = []
        cols: list[int] = []
        for row, (words, output) in self.words.items():
            n = len(output)
            for word in words:
                k = len(word) - 1
                if k == 0 or (n >= k and output[n - k:] == word[:-1]):
                    rows.append(row)
                    cols.append(word[-1])
        if rows:
            logits[_to_device(rows, self.device, self.pin), _to_device(cols, self.device, self.pin)] = _NEG_INF
        return logits


BUILTIN_LOGITS_PROCESSORS: list[type] = [AllowedTokenIdsLogitsProcessor, BadWordsLogitsProcessor]
