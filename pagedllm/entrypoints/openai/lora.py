"""LoRA adapters behind the server: `--lora-modules name=path ...` at start, each served as a model of its own (listed
by /v1/models with the base as parent, chosen by a request's "model"), and, with `--allow-runtime-lora-updating` (or
PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING=true, as vLLM's variable), POST /v1/load_lora_adapter and /v1/unload_lora_adapter.
An adapter is loaded and checked by the engine before it is listed, so a bad one is a 400, never a later failure."""

from __future__ import annotations

import itertools
import json
from typing import Any

from pydantic import BaseModel

from pagedllm.entrypoints.openai.serving_base import APIError
from pagedllm.lora.request import LoRARequest


def parse_lora_modules(values: list[str] | None) -> dict[str, str]:
    """`name=path` or vLLM's JSON form `{"name": ..., "path": ...}`, by name."""
    modules: dict[str, str] = {}
    for value in values or []:
        if value.lstrip().startswith("{"):
            spec = json.loads(value)
            name, path = spec["name"], spec["path"]
        else:
            name, sep, path = value.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules takes name=path entries; got {value!r}.")
        modules[name] = path
    return modules


class LoadLoRARequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRARequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


class LoRARegistry:
    """The adapters this server serves, by name, with the ids the engine knows them by."""

    def __init__(self, base_names: list[str]) -> None:
        self.base_names = base_names
        self.by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)

    def get(self, name: str) -> LoRARequest | None:
        return self.by_name.get(name)

    async def load(self, engine: Any, name: str, path: str) -> LoRARequest:
        if name in self.by_name or name in self.base_names:
            raise APIError(f"The model `{name}` already exists.", 400, param="lora_name")
        request = LoRARequest(name, next(self._ids), path)
        try:
            await engine.add_lora(request)
        except ValueError as error:
            raise APIError(str(error), 400, param="lora_path") from None
        self.by_name[name] = request
        return request

    async def unload(self, engine: Any, name: str) -> None:
        request = self.by_name.pop(name, None)
        if request is None:
            raise APIError(f"The lora adapter `{name}` cannot be found.", 404, param="lora_name", code="model_not_found")
        await engine.remove_lora(request.lora_int_id)
