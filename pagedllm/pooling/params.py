"""What a pooling request asks for, as vLLM's `PoolingParams`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PoolingParams:
    dimensions: int | None = None  # Matryoshka truncation (models trained for it), before normalizing
    normalize: bool | None = None  # None: as the model's pooler says
    use_activation: bool | None = None  # classifiers: sigmoid (one label) / softmax over the logits; None: True
