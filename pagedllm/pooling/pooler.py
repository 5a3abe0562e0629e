"""How a model pools its last hidden states (the final norm applied) into one vector per prompt: LAST token, MEAN over
the prompt, or CLS (the first token); then, for an embedder, an optional L2 normalization (and Matryoshka truncation),
or for a classifier (a cross-encoder) its classification head and activation: sigmoid for one label, softmax for
several (as vLLM's and sentence-transformers' defaults).

The pooling is read from sentence-transformers' files when the model has them (`modules.json` naming a Pooling module
and maybe a Normalize one, `1_Pooling/config.json`), else it is the model's default (LAST for decoders, CLS for
encoders); `pooler_config` overrides either.

A prompt that runs in several chunks is pooled as its chunks come (`PoolingState`): the first row (CLS), a running
float32 sum (MEAN), the last row of the last chunk (LAST)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pagedllm.pooling.params import PoolingParams

POOLING_TYPES = ("LAST", "MEAN", "CLS")


def pooling_task(config: Any) -> str | None:
    """What an engine config's model does as a pooling model: embed, or classify (a model with a classification
    head; one label makes it a cross-encoder that scores pairs); None when it generates."""
    from pagedllm.models.registry import get_model_class

    if config.runner != "pooling":
        return None
    return "classify" if hasattr(get_model_class(config.hf_config), "classify") else "embed"


@dataclass(frozen=True)
class Pooler:
    pooling_type: str = "LAST"
    normalize: bool = True
    num_labels: int | None = None  # a classifier's (its model has `classify`); None: an embedder

    @classmethod
    def for_model(cls, model_path: str, model: nn.Module, override: dict[str, Any] | None = None) -> Pooler:
        num_labels = getattr(model, "num_labels", None) if hasattr(model, "classify") else None
        pooling, normalize = getattr(model, "default_pooling", "LAST"), num_labels is None
        modules_file = os.path.join(model_path, "modules.json")
        if os.path.isfile(modules_file) and num_labels is None:
            with open(modules_file) as f:
                modules = json.load(f)
            normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
            for module in modules:
                if module.get("type", "").endswith("Pooling"):
                    with open(os.path.join(model_path, module.get("path", "1_Pooling"), "config.json")) as f:
                        config = json.load(f)
                    pooling = ("CLS" if config.get("pooling_mode_cls_token") else
                               "MEAN" if config.get("pooling_mode_mean_tokens") else
                               "LAST" if config.get("pooling_mode_lasttoken") else None)
                    if pooling is None:
                        raise ValueError(f"{model_path}: its sentence-transformers pooling mode is not one of "
                                         f"cls_token, mean_tokens, lasttoken: {config}.")
        override = dict(override or {})
        pooling = str(override.pop("pooling_type", pooling)).upper()
        normalize = bool(override.pop("normalize", normalize))
        if override or pooling not in POOLING_TYPES:
            raise ValueError(f"pooler_config takes pooling_type ({', '.join(POOLING_TYPES)}) and normalize; got "
                             f"{pooling!r} and {sorted(override)}.")
        return cls(pooling, normalize, num_labels)

    @property
    def task(self) -> str:
        """What the model's vectors are: embed, or classify (its label scores; a one-label classifier also scores
        query / document pairs)."""
        return "embed" if self.num_labels is None else "classify"

    def head(self, model: nn.Module, params: list[PoolingParams], pooled: torch.Tensor) -> list[torch.Tensor]:
        """Each request's final vector from its pooled row (float32 [N, hidden]), in one batch through the head."""
        if self.num_labels is None:
            if all(p.dimensions is None and p.normalize is None for p in params):  # the common case, batched
                return list(torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled)
            out = []
            for row, p in zip(pooled, params):
                row = row if p.dimensions is None else row[: p.dimensions]
                normalize = self.normalize if p.normalize is None else p.normalize
                out.append(torch.nn.functional.normalize(row, dim=-1) if normalize else row)
            return out
        dtype = next(model.parameters()).dtype
        logits = model.classify(pooled.to(dtype)).float()
        activated = logits.sigmoid() if self.num_labels == 1 else logits.softmax(dim=-1)
        return [a if p.use_activation is not False else raw for a, raw, p in zip(activated, logits, params)]


@dataclass
class PoolingState:
    """A pooling request's vector in the making (on the device)."""

    params: PoolingParams
    needs_every_row: bool = False  # MEAN and CLS: the prompt must run whole (no prefix-cache hits skip rows)
    first: torch.Tensor | None = None
    total: torch.Tensor | None = None
    count: int = 0
    result: list[float] | None = field(default=None, repr=False)

    def add(self, rows: torch.Tensor) -> None:
        if self.first is None:
            self.first = rows[0].clone()  # the rows may sit in a CUDA graph's output buffer
        summed = rows.float().sum(dim=0)
        self.total = summed if self.total is None else self.total + summed
        self.count += rows.shape[0]

    def pooled(self, pooler: Pooler, last_row: torch.Tensor) -> torch.Tensor:
        """The prompt's pooled row, float32, in memory of its own (the rows may be a CUDA graph's output buffer)."""
        assert self.first is not None and self.total is not None
        vector = {"LAST": last_row, "CLS": self.first, "MEAN": self.total / self.count}[pooler.pooling_type]
        return vector.to(torch.float32, copy=True)
