"""Which adapters are where: a CPU-side LRU cache of loaded adapters (`max_cpu_loras`) and `max_loras` slots in the
layers' stacked weights, filled between steps for the adapters a step needs (a slot whose adapter the step does not
use is reused, least recently used first)."""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn

from pagedllm.layers.linear import Linear
from pagedllm.lora.adapter import LoRAAdapter, load_adapter
from pagedllm.lora.layers import LoRASlots, wrap
from pagedllm.lora.request import LoRARequest

_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, max_cpu_loras: int) -> None:
        self.max_loras, self.max_rank, self.max_cpu_loras = max_loras, max_rank, max_cpu_loras
        stacked = getattr(model, "stacked_params", [])
        for module in model.modules():  # the delta needs the 16-bit rows: FP8 producers hand them on unquantized
            if getattr(module, "quant_rows", None) is not None:
                module.quant_rows = None
        self.layers: list[LoRASlots] = []
        for name, module in model.named_modules():
            if isinstance(module, Linear) and name.rpartition(".")[2] in _TARGETS:
                fused = sorted((i, name.replace(f".{f}", f".{shard}"))
                               for f, shard, i in stacked if name.endswith(f".{f}"))
                slots = LoRASlots(module, [n for _, n in fused] or [name], max_loras, max_rank)
                wrap(module, slots)
                self.layers.append(slots)
        self.modules = _every_stage(model, {part for layer in self.layers for part in layer.parts})
        self.renamed: list[tuple[str, str]] = list(getattr(model, "renamed_params", []))
        self.cache: OrderedDict[int, LoRAAdapter] = OrderedDict()  # by lora_int_id, least recently used first
        self.slot_ids: list[int | None] = [None] * max_loras
        self.slot_used = [0] * max_loras  # the step that last used each slot
        self.steps = 0

    def add(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter, loaded (and checked) once and kept in the CPU cache; ValueError if it cannot run here."""
        adapter = self.cache.get(request.lora_int_id)
        if adapter is not None and adapter.request.lora_path != request.lora_path:
            raise ValueError(f"lora_int_id {request.lora_int_id} is already {adapter.request.lora_name!r} at "
                             f"{adapter.request.lora_path!r}; each adapter needs its own id.")
        if adapter is None:
            adapter = load_adapter(request, self.max_rank, self.modules, self.renamed)
            self.cache[request.lora_int_id] = adapter
            while len(self.cache) > self.max_cpu_loras:  # an adapter in a slot keeps its weights there
                self.cache.popitem(last=False)
        self.cache.move_to_end(request.lora_int_id)
        return adapter

    def remove(self, lora_int_id: int) -> bool:
        found = self.cache.pop(lora_int_id, None) is not None
        if lora_int_id in self.slot_ids:
            self.slot_ids[self.slot_ids.index(lora_int_id)] = None
            found = True
        return found

    def activate(self, requests: dict[int, LoRARequest], slots: dict[int, int] | None = None) -> dict[int, int]:
        """Slots for the step's adapters (at most max_loras of them), loading those not in one yet; `slots`: the
        slot each must take (the driver's choice, on the other ranks)."""
        assert len(requests) <= self.max_loras, "the scheduler admits at most max_loras adapters per step"
        self.steps += 1
        placed = {}
        for lora_id, request in requests.items():
            if slots is None and lora_id in self.slot_ids:
                slot = self.slot_ids.index(lora_id)
            elif slots is not None and self.slot_ids[slots[lora_id]] == lora_id:
                slot = slots[lora_id]
            else:
                free = [s for s in range(self.max_loras) if self.slot_ids[s] not in requests]
                slot = slots[lora_id] if slots is not None else \
                    min(free, key=lambda s: (self.slot_ids[s] is not None, self.slot_used[s]))
                if lora_id in self.slot_ids:  # moving to the driver's slot: the old one is free
                    self.slot_ids[self.slot_ids.index(lora_id)] = None
                adapter = self.add(request)
                with torch.no_grad():
                    for layer in self.layers:
                        layer.load(slot, adapter.weights)
                self.slot_ids[slot] = lora_id
            self.slot_used[slot] = self.steps
            placed[lora_id] = slot
        return placed


def _every_stage(model: nn.Module, local: set[str]) -> set[str]:
    """The LoRA-able module names of the whole model, from this pipeline stage's: an adapter targets every layer, and
    each stage loads the layers it holds."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        return local
    templates = {re.sub(r"\.layers\.\d+\.", ".layers.{}.", name) for name in local}
    return local | {t.format(i) for t in templates if "{}" in t for i in range(len(layers))}
