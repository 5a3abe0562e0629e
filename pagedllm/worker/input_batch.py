"""The flat batch of one step, built on the host, and the pinned staging that moves it to the device in one copy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pagedllm.core.kv_cache import KVCacheManager
from pagedllm.core.scheduler import SchedulerOutput

class Staging:
    """A step's int arrays go to the device in one copy: packed into one host buffer (pinned on
    CUDA), an int64 section then an int32 one, copied, then sliced on the device. One host buffer
    per step that can be in flight at once, used in turn, so the CPU fills one while the device may
    still be copying the others (async scheduling); on CPU the host buffer is the device buffer."""

    def __init__(self, device: torch.device, nbytes: int, num_buffers: int = 2) -> None:
        self.device, self.pinned, self.num_buffers = device, device.type == "cuda", num_buffers
        self._allocate(nbytes)

    def _allocate(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned) for _ in range(self.num_buffers)]
        self.host_np = [h.numpy() for h in self.host]
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device) if self.pinned else None
        # Device views by layout: steady decoding repeats a few layouts, and slicing costs a dispatch each.
        self.views: dict[tuple, list[torch.Tensor | None]] = {}

    def pack(self, int64s: list[np.ndarray], int32s: list[np.ndarray], turn: int) -> list[torch.Tensor | None]:
        """Device tensors of the arrays, in order (int64s then int32s); None for an empty one. Each
        starts on a 16-byte boundary, as Triton kernels like their pointers."""
        n64, n32 = sum(-(-a.size // 2) * 2 for a in int64s), sum(-(-a.size // 4) * 4 for a in int32s)
        start32 = 8 * n64
        total = start32 + 4 * n32
        if total > self.nbytes:
            # The old buffers stay safe: the caching allocators hold freed memory until pending copies end.
            self._allocate(max(total, 2 * self.nbytes))
        buf = self.host_np[turn]
        h64, h32 = buf[:start32].view(np.int64), buf[start32:total].view(np.int32)
        offsets, o = [], 0
        for a in int64s:
            h64[o : o + a.size] = a
            offsets.append(o)
            o += -(-a.size // 2) * 2
        o = 0
        for a in int32s:
            h32[o : o + a.size] = a.reshape(-1)
            offsets.append(o)
            o += -(-a.size // 4) * 4
        src = self.host[turn]
        if self.dev is not None:
            self.dev[:total].copy_(src[:total], non_blocking=True)
            src, turn = self.dev, 0
        key = (turn, *(a.shape for a in int64s), *(a.shape for a in int32s))
        out = self.views.get(key)
        if out is None:
            if len(self.views) > 256:
                self.views.clear()
            d64, d32 = src[:start32].view(torch.int64), src[start32:total].view(torch.int32)
            out = []
            for a, o in zip(int64s + int32s, offsets):
                t = None if a.size == 0 else (d64 if a.dtype == np.int64 else d32)[o : o + a.size]
                out.append(t if t is None or a.ndim == 1 else t.view(a.shape))
            self.views[key] = out
        return out


@dataclass
class FlatBatch:
    input_ids: np.ndarray  # int64; entries of tokens in flight are filled on the device
    positions: np.ndarray  # int64
    slot_mapping: np.ndarray  # int64
    fill_dst: np.ndarray  # int64: flat indices whose input id is a token in flight ...
    fill_src: np.ndarray  # int64: ... and its row in the previous step's sampled ids
    logits_index: np.ndarray  # int64: the flat index of each sampled row's last token; empty when it is every token
    query_start_loc: np.ndarray  # int32
    seq_lens: np.ndarray  # int32
    block_tables: np.ndarray  # int32
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    sample_rows: list[int]  # rows whose last token is sampled this step (a row with drafts: once per verified position)
    any_prompt_logprobs: bool
    common_prefix_len: int = 0  # decode-only batches: tokens of the leading blocks every row shares
    token_type_ids: np.ndarray | None = None  # int64, each token's segment where a request has them (cross-encoders)
    # Images (multimodal/): (first flat row, image hash, first embedding row, rows) per image span the step computes;
    # None: no image tokens in the step. mrope_positions [3, tokens]: M-RoPE positions when image tokens are in it.
    mm_segments: list[tuple[int, bytes, int, int]] | None = None
    mrope_positions: np.ndarray | None = None
    # int32 [tokens]: the last key each query sees, where an image's tokens attend to each other (AttentionMetadata)
    key_limits: np.ndarray | None = None


@dataclass
class StepPlan:
    """What the driver broadcasts to the other ranks each step: enough to run the same forward and
    the same logits calls (no requests, no sampling state)."""

    batch: FlatBatch
    prompt_rows: list[tuple[int, int]]  # flat row ranges whose logits prompt logprobs need, in the driver's order
    num_prev_sampled: int  # rows the previous step sampled: tokens in flight are read from them
    lora: Any = None  # LoRAPlan: the step's adapters by slot and each token's slot (enable_lora)
    kv_copies: Any = None  # BlockCopies: host-tier loads and saves (kv_offload_bytes)
    encoder_work: Any = None  # EncoderWork: images to encode, encoder-cache entries to drop (multimodal/)


_EMPTY = np.empty(0, dtype=np.int64)


def common_prefix_len(tables: np.ndarray, seq_lens: np.ndarray, block_size: int, min_tokens: int = 0) -> int:
    """Tokens in the leading block-table columns that every row holds alike, short of each row's last
    token (a row's own blocks start there at the latest: decodes never write into a shared block);
    0 if fewer than min_tokens."""
    limit = (int(seq_lens.min()) - 1) // block_size
    need = -(-min_tokens // block_size)
    if need > limit or (need and not (tables[1:, need - 1] == tables[0, need - 1]).all()):
        return 0  # the shared columns are leading ones: a difference at column need - 1 leaves too few
    same = (tables[1:, :limit] == tables[0, :limit]).all(axis=0)
    shared = (limit if same.all() else int(same.argmin())) * block_size
    return shared if shared >= min_tokens else 0


def build_batch(sched: SchedulerOutput, kv_cache: KVCacheManager, shared_prefix_min: tuple[int, int] | None = None,
                bidirectional_images: bool = False) -> FlatBatch:
    """shared_prefix_min: (requests, tokens) from which a decode-only batch's common prefix is looked for;
    bidirectional_images: the model's image tokens attend to each other both ways (key limits for their steps)."""
    scheduled = sched.scheduled
    n = len(scheduled)
    starts_l = [r.num_computed_tokens for r, _ in scheduled]
    lens_l = [k for _, k in scheduled]
    starts = np.array(starts_l, dtype=np.int64)
    num_decodes = lens_l.count(1)  # the scheduler put them first
    if num_decodes == n:  # decodes only, the common step: one token per row
        query_lens, query_start_loc, num_tokens = None, np.arange(n + 1), n
        seq_lens = starts + 1
    else:
        query_lens = np.array(lens_l, dtype=np.int64)
        seq_lens = starts + query_lens
        query_start_loc = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(query_lens, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])

    input_ids = np.empty(num_tokens, dtype=np.int64)
    decode_ids: list[int] = []
    fill_dst: list[int] = []  # flat indices whose input is a token in flight, and its row in `prev`
    fill_src: list[int] = []
    sample_rows: list[int] = []
    for i in range(num_decodes):  # one token each: flat index == row
        request = scheduled[i][0]
        s, ids = starts_l[i], request.all_token_ids
        if s < len(ids):
            decode_ids.append(ids[s])
            if s + 1 == len(ids) + request.num_pending and request.pooling is None:
                sample_rows.append(i)
        else:  # the token in flight (pending tokens are always last)
            decode_ids.append(0)
            fill_dst.append(i)
            fill_src.append(request.pending_row)
            sample_rows.append(i)
    input_ids[:num_decodes] = decode_ids
    q = num_decodes
    spec_index: list[int] = []  # with drafts: the flat index of every sampled row, in order
    for i in range(num_decodes, n):
        request, k = scheduled[i]
        s, ids = starts_l[i], request.all_token_ids
        known = min(s + k, len(ids))
        input_ids[q : q + known - s] = ids[s:known]
        drafts = request.spec_token_ids
        if drafts:  # the last known token and the drafts: each of their positions samples (verifies)
            input_ids[q + known - s : q + k] = drafts
            if not spec_index:
                spec_index = [int(query_start_loc[r + 1]) - 1 for r in sample_rows]
            sample_rows.extend([i] * (len(drafts) + 1))
            spec_index.extend(range(q + k - len(drafts) - 1, q + k))
        else:
            if known < s + k:
                fill_dst.append(q + k - 1)
                fill_src.append(request.pending_row)
            if s + k == request.num_tokens and request.pooling is None:  # a pooling request pools, never samples
                sample_rows.append(i)
                if spec_index:
                    spec_index.append(q + k - 1)
        q += k
    any_prompt_logprobs = any(r.prompt_logprobs is not None for r, _ in scheduled)

    # Block tables: the rows of the cache manager's mirror, as wide as the longest context needs.
    block_size, max_seq_len = kv_cache.block_size, int(seq_lens.max())
    rows = [kv_cache.table_rows[r.request_id] for r, _ in scheduled]
    table_array = kv_cache.table_array[rows, : -(-max_seq_len // block_size)]
    # Positions and slots for every token, vectorised over the flat batch.
    if query_lens is None:
        row_of_token, positions = query_start_loc[:n], starts
    else:
        row_of_token = np.repeat(np.arange(n), query_lens)
        positions = np.arange(num_tokens) - query_start_loc[row_of_token] + starts[row_of_token]
    slot_mapping = table_array[row_of_token, positions // block_size].astype(np.int64) * block_size + positions % block_size
    if len(sample_rows) == n and num_tokens == n:
        logits_index = _EMPTY
    elif spec_index:
        logits_index = np.array(spec_index, dtype=np.int64)
    else:
        logits_index = query_start_loc[1:][sample_rows] - 1
    shared = 0
    if shared_prefix_min is not None and query_lens is None and n >= shared_prefix_min[0]:
        shared = common_prefix_len(table_array, seq_lens, block_size, shared_prefix_min[1])
    segments, mrope, limits = None, None, None
    if sched.has_mm:
        positions = positions.copy()  # a decode-only step's positions are `starts`
        segments, mrope, limits = _multimodal(scheduled, query_start_loc, positions, bidirectional_images)
    token_types = None
    if any(r.token_type_ids is not None for r, _ in scheduled):
        token_types = np.zeros(num_tokens, dtype=np.int64)
        for i, (request, k) in enumerate(scheduled):
            if request.token_type_ids is not None:
                start = int(query_start_loc[i])
                token_types[start : start + k] = request.token_type_ids[starts_l[i] : starts_l[i] + k]
    return FlatBatch(
        input_ids, positions, slot_mapping,
        np.array(fill_dst, dtype=np.int64) if fill_dst else _EMPTY, np.array(fill_src, dtype=np.int64) if fill_src else _EMPTY,
        logits_index, query_start_loc.astype(np.int32), seq_lens.astype(np.int32), table_array, num_decodes,
        1 if query_lens is None else int(query_lens.max()), max_seq_len, sample_rows, any_prompt_logprobs, shared,
        token_types, segments, mrope, limits,
    )


def _multimodal(scheduled: list[tuple[Any, int]], query_start_loc: np.ndarray, positions: np.ndarray,
                bidirectional_images: bool,
                ) -> tuple[list[tuple[int, bytes, int, int]] | None, np.ndarray | None, np.ndarray | None]:
    """The step's image spans; M-RoPE positions: a prompt token takes its precomputed position (every axis alike for
    text, so 1-D positions do unless image tokens are in the step: then [3, tokens]), a generated token at index i
    takes i + delta (`positions` is rewritten in place); and with `bidirectional_images` each query's last visible key
    (int32): its sequence index, or for an image token its image's last token (which the scheduler puts in the same
    step), None when no query sees past itself."""
    segments: list[tuple[int, bytes, int, int]] = []
    spans: list[tuple[int, int, int, np.ndarray]] = []  # (first flat row, start, end, positions) of prompt chunks
    limits = positions.astype(np.int32) if bidirectional_images else None  # sequence indices, before M-RoPE
    sees_ahead = False
    for i, (request, k) in enumerate(scheduled):
        mm = request.mm
        if mm is None:
            continue
        start, q = request.num_computed_tokens, int(query_start_loc[i])
        for item in mm.overlapping(start, start + k):
            lo, hi = max(start, item.offset), min(start + k, item.end)
            segments.append((q + lo - start, item.hash, lo - item.offset, hi - lo))
            if limits is not None:
                assert item.end <= start + k, "an image's tokens that attend to each other must run in one step"
                limits[q + lo - start : q + hi - start] = item.end - 1
                sees_ahead = sees_ahead or item.end - 1 > lo
        if mm.mrope_positions is None:
            continue
        prompt_end = min(start + k, mm.mrope_positions.shape[1])
        if start < prompt_end:
            positions[q : q + prompt_end - start] = mm.mrope_positions[0, start:prompt_end]
            spans.append((q, start, prompt_end, mm.mrope_positions))
        generated = max(start, prompt_end)
        positions[q + generated - start : q + k] += mm.mrope_delta
    if not segments:
        return None, None, None
    mrope = None
    if spans:
        mrope = np.repeat(positions[None, :], 3, axis=0)
        for q, start, end, table in spans:
            mrope[:, q : q + end - start] = table[:, start:end]
    return segments, mrope, limits if sees_ahead else None
