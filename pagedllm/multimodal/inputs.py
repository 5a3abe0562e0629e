"""A prompt's images as the engine carries them: each image's placeholder span in the prompt, its content hash and
the vision encoder's inputs; for M-RoPE models (Qwen2-VL) the prompt's 3-axis positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


@dataclass(eq=False)
class ImageItem:
    offset: int  # the first of its placeholder tokens in the prompt
    length: int  # its placeholder tokens: the rows of embeddings the encoder gives it
    hash: bytes  # of its pixels as processed: keys the encoder cache and the prefix-cache blocks it covers
    data: dict[str, torch.Tensor]  # the vision encoder's inputs for this image alone (pixel_values, grid / size)

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(eq=False)
class MultiModalState:
    items: list[ImageItem]  # by offset
    mrope_positions: np.ndarray | None = None  # [3, prompt tokens] int64 (M-RoPE models); None: 1-D positions
    mrope_delta: int = 0  # a generated token at sequence index i takes position i + mrope_delta on every axis

    def overlapping(self, start: int, end: int) -> Iterator[ImageItem]:
        """The images whose placeholders meet tokens [start, end)."""
        for item in self.items:
            if item.offset >= end:
                return
            if item.end > start:
                yield item

    def block_keys(self, start: int, end: int) -> bytes:
        """What a prefix-cache block over tokens [start, end) mixes into its hash: the images it shows."""
        return b"".join(item.hash for item in self.overlapping(start, end))
