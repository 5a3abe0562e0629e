"""The vision towers of Qwen2-VL and Qwen2.5-VL, and the multimodal rotary positions (M-RoPE) of their prompts.

An image arrives as the processor's patches (pixel_values [patches, C*T*P*P], grid_thw [images, 3]), each image's
patches ordered so that every 2x2 block of neighbours (the spatial merge unit) is consecutive. The tower embeds the
patches, rotates q/k by each patch's (row, col) (2D rotary), runs its blocks with attention confined to one image
(one frame), and merges each 2x2 unit into one language-model token. Qwen2.5-VL attends within windows of
`window_size` pixels except in its `fullatt_block_indexes` blocks: the merge units are reordered window by window
before the blocks (so that each window is a contiguous run) and the merged tokens put back in order at the end.

Parameter names are transformers' relative to the tower (`patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`,
`merger.mlp.0.weight`, …); checkpoints hold them under `visual.` (transformers 5 in memory: `model.visual.`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.attention.bidirectional import _varlen_attn, takes_flash
from pagedllm.layers.sharding import load_whole

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}
_VERSIONS = ("qwen2_vl", "qwen2_5_vl")


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"vision hidden_act {name!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class _RMSNorm(nn.Module):
    """Qwen2.5-VL's: normalised in float32, cast back, then scaled (the order matters in 16-bit)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class _Segments:
    """Contiguous attention segments (images, frames or windows) of the flat patch sequence. The CPU path batches the
    segments of each length into one SDPA call; the CUDA 16-bit path hands cu_seqlens to varlen flash attention."""

    def __init__(self, lengths: list[int], device: torch.device) -> None:
        lengths = [n for n in lengths if n > 0]
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.cu = torch.tensor(starts, dtype=torch.int32, device=device)
        self.longest = max(lengths, default=0)
        self.groups: list[tuple[torch.Tensor, int, int]] = []  # (token index [n * length], n, length)
        for length in sorted(set(lengths)):
            firsts = starts[:-1][np.asarray(lengths) == length]
            index = (firsts[:, None] + np.arange(length)[None, :]).reshape(-1)
            self.groups.append((torch.from_numpy(index).to(device), len(firsts), length))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q, k, v [T, heads, head_dim] -> [T, heads, head_dim], each token attending within its segment."""
        if takes_flash(q, 1, 1):
            varlen_attn = _varlen_attn()
            assert varlen_attn is not None
            return varlen_attn(q, k, v, self.cu, self.cu, self.longest, self.longest, scale=scale)
        out = torch.empty_like(q)
        for index, n, length in self.groups:
            q_, k_, v_ = (x.index_select(0, index).view(n, length, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
            attended = F.scaled_dot_product_attention(q_, k_, v_, scale=scale).transpose(1, 2)
            out.index_copy_(0, index, attended.reshape(n * length, *q.shape[1:]))
        return out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary in float32 (as transformers' vision towers): x [T, heads, D], cos/sin [T, 1, D]."""
    x32 = x.float()
    half = x32.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: _Segments) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        return self.proj(segments.attend(q, k, v.contiguous(), self.head_dim**-0.5).flatten(1))


class _MLP(nn.Module):
    """Qwen2-VL: fc1, activation, fc2."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _GatedMLP(nn.Module):
    """Qwen2.5-VL: down(act(gate(x)) * up(x)), every projection biased."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.down_proj, self.act = nn.Linear(hidden, dim), _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.norm1, self.norm2 = norm(dim), norm(dim)
        self.attn, self.mlp = _Attention(dim, num_heads), mlp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: _Segments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, channels: int, temporal: int, patch: int, dim: int) -> None:
        super().__init__()
        kernel = (temporal, patch, patch)
        self.proj = nn.Conv3d(channels, dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # The kernel covers a whole patch (stride = kernel): the convolution is a linear map of the flat patch.
        weight = self.proj.weight
        return F.linear(pixels.to(weight.dtype).view(-1, weight[0].numel()), weight.flatten(1))


class _Merger(nn.Module):
    def __init__(self, dim: int, out_dim: int, merge: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.ln_q = norm(dim)
        hidden = dim * merge**2
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class Qwen2VisionTransformer(nn.Module):
    """forward(pixel_values [patches, C*T*P*P], grid_thw [images, 3]) -> [merged tokens, out_hidden_size]: the rows
    that replace the images' `<|image_pad|>` tokens, images in order (transformers' `model.visual(...)`
    pooler_output)."""

    def __init__(self, vision_config: Any, version: str | None = None) -> None:
        super().__init__()
        version = version or ("qwen2_5_vl" if "2_5" in str(vision_config.model_type) else "qwen2_vl")
        if version not in _VERSIONS:
            raise ValueError(f"version must be one of {_VERSIONS}, got {version!r}")
        c = vision_config
        self.version, self.merge, self.patch_size = version, c.spatial_merge_size, c.patch_size
        self.rope_theta = float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        if version == "qwen2_vl":
            dim, out_dim = c.embed_dim, c.hidden_size
            norm: Callable[[int], nn.Module] = lambda d: nn.LayerNorm(d, eps=1e-6)  # noqa: E731
            mlp: Callable[[], nn.Module] = lambda: _MLP(dim, int(dim * c.mlp_ratio), c.hidden_act)  # noqa: E731
            self.window_size, self.full_blocks = 0, set(range(c.depth))
        else:
            dim, out_dim, norm = c.hidden_size, c.out_hidden_size, _RMSNorm
            mlp = lambda: _GatedMLP(dim, c.intermediate_size, c.hidden_act)  # noqa: E731
            self.window_size, self.full_blocks = c.window_size, set(c.fullatt_block_indexes)
        self.num_heads = c.num_heads
        self.head_dim = dim // c.num_heads
        self.patch_embed = _PatchEmbed(c.in_channels, c.temporal_patch_size, c.patch_size, dim)
        self.blocks = nn.ModuleList(_Block(dim, c.num_heads, mlp(), norm) for _ in range(c.depth))
        self.merger = _Merger(dim, out_dim, self.merge, norm)

    def _rotary(self, grids: list[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [patches, 1, head_dim]: the first half of each head's frequencies turns by the patch's row, the
        second by its column (each half repeated, for rotate-half); patches in merge-unit-major order."""
        m = self.merge
        rows, cols = [], []
        for t, h, w in grids:
            # (h/m, m, w/m, m) blocks, transposed so that each m x m unit's patches are consecutive
            r = np.arange(h)[:, None].repeat(w, 1).reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
            c = np.arange(w)[None, :].repeat(h, 0).reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
            rows.append(np.tile(r, t))
            cols.append(np.tile(c, t))
        quarter = self.head_dim // 2
        inv_freq = 1.0 / self.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float32, device=device) / quarter)
        pos = torch.from_numpy(np.stack([np.concatenate(rows), np.concatenate(cols)], 1)).to(device)
        angles = (pos[:, :, None].float() * inv_freq).flatten(1)  # [patches, row freqs + col freqs]
        angles = torch.cat([angles, angles], dim=-1)[:, None, :]
        return angles.cos(), angles.sin()

    def _windows(self, grids: list[tuple[int, int, int]]) -> tuple[np.ndarray, list[int]]:
        """Qwen2.5-VL: the merge units in window order (windows of each frame row-major, units row-major inside a
        window; the last row/column of windows may be partial), and the windows' lengths in patches."""
        span = self.window_size // self.merge // self.patch_size  # merge units per window side
        order, lengths, offset = [], [], 0
        for t, h, w in grids:
            gh, gw = h // self.merge, w // self.merge
            units = np.arange(t * gh * gw).reshape(t, gh, gw)
            for frame in units:
                for r in range(0, gh, span):
                    for c in range(0, gw, span):
                        window = frame[r:r + span, c:c + span].reshape(-1)
                        order.append(window + offset)
                        lengths.append(window.size * self.merge**2)
            offset += t * gh * gw
        return np.concatenate(order), lengths

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grids = [(int(t), int(h), int(w)) for t, h, w in grid_thw.tolist()]
        device = pixel_values.device
        x = self.patch_embed(pixel_values)
        cos, sin = self._rotary(grids, device)
        frames = _Segments([h * w for t, h, w in grids for _ in range(t)], device)
        windows, unit_order = frames, None
        if len(self.full_blocks) < len(self.blocks):
            order, lengths = self._windows(grids)
            unit_order = torch.from_numpy(order).to(device)
            unit = self.merge**2  # a merge unit's patches are consecutive: permute whole units
            x, cos, sin = (y.unflatten(0, (-1, unit))[unit_order].flatten(0, 1) for y in (x, cos, sin))
            windows = _Segments(lengths, device)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames if i in self.full_blocks else windows)
        merged = self.merger(x)
        if unit_order is not None:
            merged = merged[torch.argsort(unit_order)]
        return merged

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        """Copies checkpoint tensors into the parameters by name (relative to the tower; a leading `visual.` or
        `model.visual.` is dropped) and returns the names loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            for prefix in ("model.visual.", "visual."):
                name = name[len(prefix):] if name.startswith(prefix) else name
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in the {self.version} vision tower.")
            tensor = tensor if isinstance(tensor, torch.Tensor) else tensor[:]  # a lazy safetensors slice
            load_whole(params[name], tensor, name)  # shape checked
            loaded.add(name)
        return loaded


def image_token_count(grid_thw: tuple[int, int, int], spatial_merge_size: int) -> int:
    """The `<|image_pad|>` tokens (merged tokens) of one image of patch grid (t, h, w)."""
    t, h, w = grid_thw
    return t * h * w // spatial_merge_size**2


def mrope_positions(input_ids: list[int], image_grid_thw: list[tuple[int, int, int]], image_token_id: int,
                    vision_start_token_id: int, spatial_merge_size: int) -> tuple[np.ndarray, int]:
    """M-RoPE positions [3 (t, h, w), L] of a prompt, and mrope_delta: generated token i (0-based in the whole
    sequence) takes position i + delta on all three axes. Text counts up on all axes; an image (a run of image
    tokens right after <|vision_start|>) starting at position p takes (p, p + row, p + col) over its merged grid,
    and the text after it resumes at p + max(rows, cols), as transformers' get_rope_index."""
    ids = np.asarray(input_ids, dtype=np.int64)
    starts = np.flatnonzero((ids[:-1] == vision_start_token_id) & (ids[1:] == image_token_id)) + 1
    if len(starts) != len(image_grid_thw):
        raise ValueError(f"the prompt has {len(starts)} images (<|vision_start|> then an image token) but "
                         f"{len(image_grid_thw)} image grids were given.")
    positions = np.empty((3, len(ids)), dtype=np.int64)
    cursor, next_pos = 0, 0
    for start, (t, h, w) in zip(starts.tolist(), image_grid_thw):
        positions[:, cursor:start] = next_pos + np.arange(start - cursor)
        next_pos += start - cursor
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        end = start + t * gh * gw
        if end > len(ids) or (ids[start:end] != image_token_id).any():
            raise ValueError(f"image at token {start} needs {end - start} image tokens for grid {(t, h, w)}.")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        positions[:, start:end] = next_pos + np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)])
        next_pos += max(gh, gw)
        cursor = end
    positions[:, cursor:] = next_pos + np.arange(len(ids) - cursor)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions, delta
