"""Integer-weight references, written apart from pagedllm/quantization (explicit per-slot packing loops, no shared
helpers): `make_int_checkpoint` writes a float checkpoint's linears in one of the formats below, round to nearest,
and `dequantized_checkpoint` writes the float model those codes stand for, which transformers runs as the oracle
(with int8 activations fake-quantized per token for W8A8: `install_int8_hooks`).

The layouts are those their writers produce: GPTQ as AutoGPTQ / GPTQModel's v1 format, AWQ as AutoAWQ's GEMM version,
compressed-tensors as llm-compressor's pack-quantized and int-quantized (checked against the compressed-tensors
package's own decompression in tests/test_int_quantization.py)."""

from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True)
class Format:
    kind: str  # gptq | awq | ct-pack | ct-int8
    bits: int
    group: int  # -1: per channel
    symmetric: bool
    act_order: bool = False


FORMATS = {
    "gptq": Format("gptq", 4, 32, True),
    "gptq-act": Format("gptq", 4, 32, False, act_order=True),
    "gptq8": Format("gptq", 8, -1, True),
    "awq": Format("awq", 4, 32, False),
    "ct-w4a16": Format("ct-pack", 4, 32, True),
    "ct-w4a16-asym": Format("ct-pack", 4, 32, False),
    "ct-w8a16": Format("ct-pack", 8, -1, True),
    "ct-w8a8": Format("ct-int8", 8, -1, True),
    "gptq-g128": Format("gptq", 4, 128, True),  # SmolLM2's quality runs: 576 = 4.5 groups
    "gptq-g128-asym": Format("gptq", 4, 128, False),
    "gptq-g32-asym": Format("gptq", 4, 32, False),
    "ct-w4a16-g128": Format("ct-pack", 4, 128, True),
}


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_along(codes: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """32 / bits codes per int32 along `dim`; slot j (bits j*bits..) holds code order[j] of each run."""
    per = 32 // bits
    order = order or tuple(range(per))
    c = codes.long().movedim(dim, 0)
    words = torch.zeros((c.shape[0] // per, *c.shape[1:]), dtype=torch.long)
    for slot in range(per):
        words |= c[order[slot] :: per] << (bits * slot)
    return _to_int32(words).movedim(0, dim).contiguous()


def quantize(w: torch.Tensor, fmt: Format, group_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unsigned codes [N, K], scales [N, G] and unsigned zero points [N, G] (float64), column k in group group_of[k]."""
    top, mid = (1 << fmt.bits) - 1, 1 << (fmt.bits - 1)
    groups = int(group_of.max()) + 1
    n = w.shape[0]
    scales, zeros = torch.zeros(n, groups, dtype=torch.float64), torch.zeros(n, groups, dtype=torch.float64)
    codes = torch.zeros(w.shape, dtype=torch.long)
    for g in range(groups):
        cols = (group_of == g).nonzero().flatten()
        part = w[:, cols].double()
        if fmt.symmetric:
            s, z = part.abs().amax(1) / (mid - 1), torch.full((n,), float(mid), dtype=torch.float64)
        else:
            lo, hi = part.amin(1).clamp(max=0), part.amax(1).clamp(min=0)
            s = (hi - lo) / top
            z = (-lo / s).round().clamp(0, top)
        scales[:, g], zeros[:, g] = s, z
        codes[:, cols] = (part / s[:, None] + z[:, None]).round().clamp(0, top).long()
    return codes, scales, zeros


def _groups(k: int, fmt: Format, seed: int) -> tuple[torch.Tensor, bool]:
    """Each input column's group, and whether it is written out (g_idx): act order permutes the columns first."""
    size = k if fmt.group == -1 else fmt.group
    order = torch.arange(k)
    if fmt.act_order:
        order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    group_of = torch.empty(k, dtype=torch.long)
    group_of[order] = torch.arange(k) // size
    return group_of, fmt.kind == "gptq"


def _write_linear(out: dict[str, torch.Tensor], module: str, w: torch.Tensor, fmt: Format, seed: int,
                  hessian: torch.Tensor | None = None) -> torch.Tensor:
    """Writes one linear's tensors (GPTQ's codes where the inputs' `hessian` is given, else rounded to nearest);
    returns the float32 weight its codes stand for."""
    group_of, with_g_idx = _groups(w.shape[1], fmt, seed)
    if hessian is not None:
        from tests.reference.calibrated import gptq

        assert not fmt.act_order, "calibrated checkpoints keep their columns in order"
        codes, scales, zeros = gptq(w, hessian, fmt)
    else:
        codes, scales, zeros = quantize(w, fmt, group_of)
    bits = fmt.bits
    if fmt.kind in ("gptq", "awq"):
        scales = scales.half().double()  # their scales are float16 in the checkpoint
    deq = ((codes - zeros[:, group_of]).double() * scales[:, group_of]).float()
    if fmt.kind == "gptq":
        out[f"{module}.qweight"] = pack_along(codes.t(), bits, 0)
        stored = (zeros.long() - 1) & ((1 << bits) - 1)  # v1 stores zero points minus one
        out[f"{module}.qzeros"] = pack_along(stored.t(), bits, 1)
        out[f"{module}.scales"] = scales.t().half().contiguous()
        if with_g_idx:
            out[f"{module}.g_idx"] = group_of.to(torch.int32)
    elif fmt.kind == "awq":
        out[f"{module}.qweight"] = pack_along(codes.t(), bits, 1, AWQ_ORDER)
        out[f"{module}.qzeros"] = pack_along(zeros.long().t(), bits, 1, AWQ_ORDER)
        out[f"{module}.scales"] = scales.t().half().contiguous()
    elif fmt.kind == "ct-pack":  # signed codes + 2**(bits-1), i.e. our unsigned codes
        out[f"{module}.weight_packed"] = pack_along(codes, bits, 1)
        out[f"{module}.weight_scale"] = scales.float().contiguous()
        out[f"{module}.weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
        if not fmt.symmetric:
            out[f"{module}.weight_zero_point"] = pack_along(zeros.long(), bits, 0)
    else:  # int-quantized: signed int8 codes, one scale per row
        out[f"{module}.weight"] = (codes - 128).to(torch.int8)
        out[f"{module}.weight_scale"] = scales.float().contiguous()
    return deq


def quantization_config(fmt: Format) -> dict[str, Any]:
    if fmt.kind == "gptq":
        return {"quant_method": "gptq", "bits": fmt.bits, "group_size": fmt.group, "desc_act": fmt.act_order,
                "sym": fmt.symmetric, "checkpoint_format": "gptq", "damp_percent": 0.01, "static_groups": False,
                "true_sequential": True}
    if fmt.kind == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": fmt.group, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}
    weights = {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric, "dynamic": False, "actorder": None,
               "strategy": "channel" if fmt.group == -1 else "group", "group_size": None if fmt.group == -1 else fmt.group,
               "observer": "minmax", "block_structure": None}
    acts = None
    if fmt.kind == "ct-int8":
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token",
                "group_size": None, "actorder": None, "observer": None, "block_structure": None}
    layout = "pack-quantized" if fmt.kind == "ct-pack" else "int-quantized"
    return {"quant_method": "compressed-tensors", "format": layout, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "output_activations": None, "format": layout}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None}


def _copy_rest(src: str, dst: str, tensors: dict[str, torch.Tensor], qc: dict[str, Any] | None) -> str:
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(src, "config.json")))
    config.pop("quantization_config", None)
    if qc is not None:
        config["quantization_config"] = qc
    json.dump(config, open(os.path.join(dst, "config.json"), "w"), indent=2)
    for f in os.listdir(src):
        if f not in ("config.json", "model.safetensors") and os.path.isfile(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), dst)
    return dst


def make_int_checkpoint(src: str, dst: str, name: str, tensors: dict[str, torch.Tensor] | None = None,
                        hessians: dict[str, torch.Tensor] | None = None) -> tuple[str, str]:
    """Writes `src`'s float model (or `tensors`, its state dict changed: smoothed, say) to `dst` in format `name`,
    and the float model its codes stand for to `dst`-dequantized; returns both paths. `hessians`: per module,
    for GPTQ's codes (tests/reference/calibrated.py)."""
    fmt, ref = FORMATS[name], dst + "-dequantized"
    if os.path.exists(os.path.join(dst, "config.json")):
        return dst, ref
    os.makedirs(dst, exist_ok=True)
    os.makedirs(ref, exist_ok=True)
    tensors = tensors if tensors is not None else load_file(os.path.join(src, "model.safetensors"))
    out, deq = {}, {}
    for name_, t in sorted(tensors.items()):
        module, _, leaf = name_.rpartition(".")
        if leaf != "weight" or module.rpartition(".")[2] not in TARGETS:
            out[name_] = deq[name_] = t.contiguous()
            continue
        # act order sorts a layer's input columns by its Hessian, which q/k/v (and gate/up) share: one order each
        shared_input = module.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
        deq[name_] = _write_linear(out, module, t.float(), fmt, seed=zlib.crc32(shared_input.encode()),
                                   hessian=None if hessians is None else hessians[module])
    _copy_rest(src, ref, deq, None)
    return _copy_rest(src, dst, out, quantization_config(fmt)), ref


def install_int8_hooks(model: nn.Module) -> None:
    """W8A8: each target linear's input rounded to int8 per token (scale amax / 127) and back."""
    def fake_quant(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        x = args[0]
        scale = (x.abs().amax(-1, keepdim=True).float() / 127).clamp(min=1e-10)
        return ((x.float() / scale).round().clamp(-128, 127) * scale).to(x.dtype),

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in TARGETS:
            module.register_forward_pre_hook(fake_quant)
