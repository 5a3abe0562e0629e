"""Random PEFT LoRA adapters made with `peft` itself, and transformers + peft as the oracle of their outputs."""

from __future__ import annotations

import os

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: str, path: str, rank: int = 8, alpha: int = 16, targets: list[str] | None = None,
                 rslora: bool = False, seed: int = 0) -> str:
    """A LoRA adapter of `base` with random A and B (peft's own init leaves B zero: the adapter would do nothing)."""
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        return path
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or TARGETS, use_rslora=rslora,
                        init_lora_weights=False, lora_dropout=0.0)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(path)
    return path


class PeftOracle:
    """transformers + peft, greedy, float32 on CPU, one adapter (or the base) at a time."""

    def __init__(self, base: str) -> None:
        from transformers import AutoModelForCausalLM

        self.base = base
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None

    @torch.inference_mode()
    def greedy(self, adapter: str | None, prompt: list[int], max_new_tokens: int) -> list[int]:
        from peft import PeftModel

        model = self.model if adapter is None else PeftModel.from_pretrained(self.model, adapter).eval()
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        if adapter is not None:
            model.unload()  # the base model's modules back as they were
        return out[0, len(prompt):].tolist()
