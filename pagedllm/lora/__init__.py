"""Multi-LoRA: many PEFT adapters over one base model, mixed in one batch (request.py, adapter.py, layers.py,
manager.py)."""

from pagedllm.lora.request import LoRARequest

__all__ = ["LoRARequest"]
