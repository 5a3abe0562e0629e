"""Bidirectional attention for encoder models (BERT, XLM-R): every token of a prompt sees every other token of the
same prompt, and nothing is cached. An encoder's prompts run whole in one step (no chunking, no prefix cache: a
position's state depends on the tokens after it), so the step's own keys and values are the whole context.

On CUDA in 16-bit, torch's variable-length flash attention takes the flat batch as it is. Elsewhere the prompts are
sorted by length and cut into groups of similar lengths (padding at most ~1/4 of a group's cells); each group is
padded to its longest and attended in one masked SDPA call. The layout is built once per step and shared by the
layers."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pagedllm.attention.backend import AttentionMetadata

_SLACK = 1.25  # a group's padded cells may exceed its tokens by this factor (plus _SLACK_TOKENS)
_SLACK_TOKENS = 32


@dataclass
class PromptGroup:
    gather: torch.Tensor  # [prompts * longest] the flat token in each cell of the group's grid (0 for padding)
    key_mask: torch.Tensor | None  # [prompts, 1, 1, longest] True where a key is real; None: no padding
    cells: torch.Tensor | None  # [tokens] the grid cells that are real tokens (None: all of them)
    tokens: torch.Tensor  # [tokens] their flat indices, in the same order
    num_prompts: int
    longest: int


@dataclass
class PaddedLayout:
    groups: list[PromptGroup]

    @classmethod
    def build(cls, query_start_loc: list[int], device: torch.device) -> PaddedLayout:
        lens = [b - a for a, b in zip(query_start_loc, query_start_loc[1:])]
        order = sorted(range(len(lens)), key=lens.__getitem__)
        spans: list[list[int]] = []
        total = 0
        for i in order:
            if spans and lens[i] * (len(spans[-1]) + 1) <= _SLACK * (total + lens[i]) + _SLACK_TOKENS:
                spans[-1].append(i)
                total += lens[i]
            else:
                spans.append([i])
                total = lens[i]
        return cls([_group([query_start_loc[i] for i in span], [lens[i] for i in span], device) for span in spans])


def _group(starts: list[int], lens: list[int], device: torch.device) -> PromptGroup:
    longest = max(lens)
    offset = torch.arange(longest)
    length = torch.tensor(lens)
    real = offset[None, :] < length[:, None]
    flat = torch.tensor(starts)[:, None] + offset[None, :]
    padded = min(lens) != longest
    gather = torch.where(real, flat, 0).reshape(-1)
    cells = real.reshape(-1).nonzero().squeeze(1) if padded else None
    return PromptGroup(gather.to(device), real[:, None, None, :].to(device) if padded else None,
                       None if cells is None else cells.to(device), flat[real].to(device), len(lens), longest)


@functools.cache
def _varlen_attn() -> Callable[..., torch.Tensor] | None:
    """torch's variable-length flash attention (torch >= 2.9), imported on first use on CUDA: its module imports
    triton, which a CPU process must not import before its kernel tests set TRITON_INTERPRET."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # pragma: no cover
        return None
    return varlen_attn


def takes_flash(qkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> bool:
    """Whether the variable-length flash kernel runs (no padded layout needed)."""
    return (qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16) and num_heads == num_kv_heads
            and _varlen_attn() is not None)


def bidirectional_attention(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                            meta: AttentionMetadata, scale: float, layout: PaddedLayout | None) -> torch.Tensor:
    """qkv [T, (H + 2 Hkv) * D] of whole prompts laid out by meta.query_start_loc -> [T, H * D]. layout: the
    step's padded groups (needed unless the flash path runs)."""
    split = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    if takes_flash(qkv, num_heads, num_kv_heads):
        varlen_attn = _varlen_attn()
        assert varlen_attn is not None
        q, k, v = (x.view(-1, h, head_dim) for x, h in zip(qkv.split(split, dim=-1), (num_heads, num_kv_heads, num_kv_heads)))
        cu, longest = meta.query_start_loc, meta.max_query_len
        return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale).flatten(1)
    assert layout is not None
    out = qkv.new_empty(qkv.shape[0], num_heads * head_dim)
    for g in layout.groups:
        rows = qkv.index_select(0, g.gather).view(g.num_prompts, g.longest, -1)
        q, k, v = (x.unflatten(-1, (-1, head_dim)).transpose(1, 2) for x in rows.split(split, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=g.key_mask, scale=scale,
                                                  enable_gqa=num_heads != num_kv_heads)
        attended = attended.transpose(1, 2).reshape(g.num_prompts * g.longest, -1)
        out.index_copy_(0, g.tokens, attended if g.cells is None else attended.index_select(0, g.cells))
    return out
