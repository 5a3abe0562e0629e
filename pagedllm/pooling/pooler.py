"""How a model pools its last hidden states (the final norm applied) into one vector per prompt: LAST token, MEAN over
the prompt, or CLS (the first token), then an optional L2 normalization; read from sentence-transformers' files when
the model has them (`modules.json` naming a Pooling module and maybe a Normalize one, `1_Pooling/config.json`), else
vLLM's default for decoder models (LAST, normalized); `pooler_config` overrides either.

A prompt that runs in several chunks is pooled as its chunks come (`PoolingState`): the first row (CLS), a running
float32 sum (MEAN), the last row of the last chunk (LAST)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from pagedllm.pooling.params import PoolingParams

POOLING_TYPES = ("LAST", "MEAN", "CLS")


@dataclass(frozen=True)
class Pooler:
    pooling_type: str = "LAST"
    normalize: bool = True

    @classmethod
    def for_model(cls, model_path: str, override: dict[str, Any] | None = None) -> Pooler:
        pooling, normalize = "LAST", True
        modules_file = os.path.join(model_path, "modules.json")
        if os.path.isfile(modules_file):
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
        return cls(pooling, normalize)


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

    def finish(self, pooler: Pooler, last_row: torch.Tensor) -> torch.Tensor:
        assert self.first is not None and self.total is not None
        vector = {"LAST": last_row, "CLS": self.first, "MEAN": self.total / self.count}[pooler.pooling_type]
        vector = vector.to(torch.float32, copy=True)  # own memory: the rows may be a CUDA graph's output buffer
        if self.params.dimensions is not None:
            vector = vector[: self.params.dimensions]
        normalize = pooler.normalize if self.params.normalize is None else self.params.normalize
        return torch.nn.functional.normalize(vector, dim=-1) if normalize else vector
