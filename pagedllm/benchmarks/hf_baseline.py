"""The baseline: transformers' `generate` on the same requests, device and dtype, in static batches.

Each batch runs until its longest request is done (min_new_tokens = max_new_tokens, so EOS never ends a
row early); only the tokens the requests asked for are counted, so the extra work of a batch with mixed
output lengths shows up as lower throughput, which is the cost of static batching.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from torch import nn

from pagedllm.benchmarks import synchronize
from pagedllm.benchmarks.workloads import BenchRequest


def load_hf_model(model_path: str, hf_config: Any, load_format: str, dtype: torch.dtype, device: str) -> nn.Module:
    """The checkpoint's weights, or (load_format dummy) a randomly initialised model of the config's shape."""
    from transformers import AutoModelForCausalLM

    if load_format == "dummy":
        with torch.device(device):  # initialise on the device: random init of 8B weights on CPU takes minutes
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    return model.eval()


@torch.inference_mode()
def generate_batch(model: nn.Module, requests: Sequence[BenchRequest], temperature: float, pad_id: int) -> torch.Tensor:
    """One static batch, prompts left-padded to the longest; returns the generated ids [batch, new tokens]."""
    device = next(model.parameters()).device
    width = max(len(r.prompt_token_ids) for r in requests)
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, request in enumerate(requests):
        n = len(request.prompt_token_ids)
        ids[row, width - n :] = torch.tensor(request.prompt_token_ids)
        mask[row, width - n :] = 1
    new_tokens = max(r.output_len for r in requests)
    sampling: dict[str, Any] = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    out = model.generate(
        ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        pad_token_id=pad_id, **sampling,
    )
    return out[:, width:]


def run_batches(model: nn.Module, requests: Sequence[BenchRequest], batch_size: int, temperature: float, pad_id: int) -> float:
    """Runs every request in static batches of `batch_size`, in order; returns the elapsed seconds."""
    device = str(next(model.parameters()).device)
    synchronize(device)
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i : i + batch_size]
        out = generate_batch(model, batch, temperature, pad_id)
        if out.shape[1] != max(r.output_len for r in batch):
            raise RuntimeError(f"transformers generated {out.shape[1]} tokens, expected {max(r.output_len for r in batch)}.")
    synchronize(device)
    return time.perf_counter() - start


def pad_token_id(hf_config: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(hf_config, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0
