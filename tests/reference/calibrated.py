"""Calibrated quantization for the quality figures of integer checkpoints (benchmarks/int_quality.py): what
checkpoint makers run before writing a format, so that perplexity measures a checkpoint as users get it rather
than round-to-nearest codes.

- GPTQ (Frantar et al., 2022): columns quantized in order, each one's rounding error spread over the columns not
  yet quantized through the inverse Hessian of the layer's inputs (H = 2 X^T X from calibration text).
- SmoothQuant (Xiao et al., 2022) for W8A8: per input channel j, s_j = amax|X_j|^a / amax|W_j|^(1-a) moves the
  activations' outlier channels into the weights (X / s, W * s), folded into the RMSNorm before q/k/v and gate/up.

Calibration text: the docstrings of Python's standard library (English prose, offline, and not the evaluated text).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch
from torch import nn

from tests.reference.int_quant import TARGETS, Format

STDLIB = ("collections", "functools", "itertools", "os", "pathlib", "json", "re", "typing", "asyncio", "subprocess",
          "threading", "logging", "argparse", "dataclasses", "inspect", "unittest", "email", "http.client", "csv",
          "datetime", "decimal", "fractions", "statistics", "random", "heapq", "bisect", "textwrap", "string",
          "socket", "shutil", "tempfile", "zipfile", "tarfile", "sqlite3", "urllib.parse", "xml.etree.ElementTree")


def calibration_text() -> str:
    """Docstrings of a fixed list of standard-library modules, their classes and functions, in a fixed order."""
    parts = []
    for name in STDLIB:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for _, obj in sorted(vars(module).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == name:
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if len(p) > 200)


@torch.inference_mode()
def input_statistics(model: nn.Module, ids: torch.Tensor, window: int = 512) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per target linear: (H = 2 X^T X / n in float64, per-input-channel amax |X|) over windows of `ids`."""
    stats: dict[str, list] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            h, amax, n = stats.get(name, (0.0, torch.zeros(x.shape[1], dtype=torch.float64), 0))
            stats[name] = [h + 2 * x.t() @ x, torch.maximum(amax, x.abs().amax(0)), n + x.shape[0]]
        return record

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.rpartition(".")[2] in TARGETS]
    for start in range(0, ids.numel() - window + 1, window):
        model(ids[start : start + window][None])
    for h in hooks:
        h.remove()
    return {name: (h / n, amax) for name, (h, amax, n) in stats.items()}


def gptq(w: torch.Tensor, hessian: torch.Tensor, fmt: Format, damp: float = 0.01, block: int = 128
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes [N, K], scales and zero points [N, G] (float64) of `fmt` (groups in column order), as int_quant.quantize
    returns them, with GPTQ's error feedback."""
    w, h = w.double().clone(), hessian.clone()
    n, k = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    size = k if fmt.group == -1 else fmt.group
    top, mid = (1 << fmt.bits) - 1, 1 << (fmt.bits - 1)
    codes = torch.zeros(n, k, dtype=torch.long)
    groups = -(-k // size)
    scales, zeros = torch.zeros(n, groups, dtype=torch.float64), torch.zeros(n, groups, dtype=torch.float64)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb, errors, hb = w[:, b0:b1].clone(), torch.zeros(n, b1 - b0, dtype=torch.float64), hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % size == 0:  # the group's parameters from its columns as updated so far
                part = torch.cat([wb[:, i:], w[:, b1:]], dim=1)[:, :size]
                g = col // size
                if fmt.symmetric:
                    scales[:, g], zeros[:, g] = part.abs().amax(1).clamp(min=1e-12) / (mid - 1), mid
                else:
                    lo, hi = part.amin(1).clamp(max=0), part.amax(1).clamp(min=0)
                    scales[:, g] = ((hi - lo) / top).clamp(min=1e-12)
                    zeros[:, g] = (-lo / scales[:, g]).round().clamp(0, top)
            g = col // size
            q = (wb[:, i] / scales[:, g] + zeros[:, g]).round().clamp(0, top)
            codes[:, col] = q.long()
            err = (wb[:, i] - (q - zeros[:, g]) * scales[:, g]) / hb[i, i]
            wb[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errors[:, i] = err
        w[:, b1:] -= errors @ hinv[b0:b1, b1:]
    return codes, scales, zeros


def smooth(tensors: dict[str, torch.Tensor], amax: dict[str, torch.Tensor], layers: int, alpha: float) -> None:
    """SmoothQuant in place on a float state dict: the inputs of q/k/v and of gate/up, whose RMSNorm weights absorb
    1 / s (`amax`: per-channel input amax keyed by module name)."""
    groups = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
              ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
    for i in range(layers):
        for norm, linears in groups:
            names = [f"model.layers.{i}.{m}" for m in linears]
            w_amax = torch.stack([tensors[f"{m}.weight"].double().abs().amax(0) for m in names]).amax(0)
            x_amax = amax[names[0]]
            s = (x_amax.clamp(min=1e-5) ** alpha / w_amax.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
            norm_weight = tensors[f"model.layers.{i}.{norm}.weight"]
            tensors[f"model.layers.{i}.{norm}.weight"] = (norm_weight.double() / s).to(norm_weight.dtype)
            for m in names:
                weight = tensors[f"{m}.weight"]
                tensors[f"{m}.weight"] = (weight.double() * s[None, :]).to(weight.dtype)


def make_calibrated_checkpoint(src: str, dst: str, name: str, use_gptq: bool = True, smooth_alpha: float | None = None,
                               tokens: int = 16384) -> tuple[str, str]:
    """make_int_checkpoint with GPTQ codes (and SmoothQuant first, given alpha), calibrated on `tokens` tokens of
    calibration_text()."""
    import os

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.reference.int_quant import make_int_checkpoint

    if os.path.exists(os.path.join(dst, "config.json")):
        return dst, dst + "-dequantized"
    tensors = load_file(os.path.join(src, "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(src)(calibration_text(), return_tensors="pt").input_ids[0][:tokens]
    stats = input_statistics(model, ids)
    if smooth_alpha is not None:
        smooth(tensors, {n: amax for n, (_, amax) in stats.items()}, model.config.num_hidden_layers, smooth_alpha)
        model.load_state_dict(tensors, strict=False)
        stats = input_statistics(model, ids) if use_gptq else stats
    hessians = {n: h for n, (h, _) in stats.items()} if use_gptq else None
    return make_int_checkpoint(src, dst, name, tensors=tensors, hessians=hessians)
