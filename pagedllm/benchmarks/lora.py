"""`--num-loras N [--lora-rank R]` for bench throughput / latency: N random PEFT adapters of rank R on the model's
seven projections (attention only for mixture-of-experts shapes), written to a temporary directory; the requests
use them in turn, and the run is compared with the same requests on the base model alone, in the same process."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

import torch
from safetensors.torch import save_file

from pagedllm.lora.request import LoRARequest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-loras", type=int, default=0,
                        help="run the requests over this many random LoRA adapters (in turn), after a run without")
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of the random adapters (default 16)")


def _shapes(hf: Any) -> dict[str, tuple[int, int]]:
    """(out, in) of each LoRA target of one layer."""
    hidden, heads = hf.hidden_size, hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hidden // heads
    kv = (getattr(hf, "num_key_value_heads", None) or heads) * head_dim
    shapes = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv, hidden),
              "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, heads * head_dim)}
    if not (getattr(hf, "num_experts", None) or getattr(hf, "num_local_experts", None)):
        inter = hf.intermediate_size
        shapes.update({"mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)})
    return shapes


def random_adapters(hf: Any, count: int, rank: int, root: str | None = None) -> list[LoRARequest]:
    root = root or tempfile.mkdtemp(prefix="pagedllm-bench-lora-")
    shapes = _shapes(hf)
    targets = sorted({name.rpartition(".")[2] for name in shapes})
    requests = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(hf.num_hidden_layers):
            for name, (out, inp) in shapes.items():
                prefix = f"base_model.model.model.layers.{layer}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, inp, generator=g) * inp**-0.5).to(torch.bfloat16)
                tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out, rank, generator=g) * 0.01).to(torch.bfloat16)
        path = os.path.join(root, f"adapter{i}")
        os.makedirs(path, exist_ok=True)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets, "bias": "none"}, f)
        requests.append(LoRARequest(f"adapter{i}", i + 1, path))
    return requests


def engine_overrides(num_loras: int, rank: int) -> dict[str, Any]:
    return dict(enable_lora=True, max_loras=num_loras, max_lora_rank=rank)
