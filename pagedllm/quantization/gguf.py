"""GGUF weights kept quantized: each decoder linear holds its checkpoint's raw GGUF blocks, and CUDA multiplies
through the dequantizing GEMV/GEMM of pagedllm/kernels/gguf_gemm.py (llama.cpp's and vLLM's approach) instead of a
dense copy: Llama-3-8B in Q4_K_M streams ~4.9 GB per decode step, not 16.

Where it runs: a .gguf model on CUDA (its converted directory records the source file: pagedllm/models/gguf.py), and
`quantization="gguf"` with `load_format="dummy"` on any config (random blocks in llama.cpp's Q4_K_M mix, for
benchmarks). CPU keeps the dequantized conversion; PAGEDLLM_GGUF_QUANTIZED=1 forces this method there too (its torch
reference product, which dequantizes each part once, on first use: for the tests), =0 turns it off on CUDA (dense
weights, as before).

The layout: GGUF blocks run along the input features, so a weight [N, K] is uint8 [N, K / block_elems * block_bytes],
one row per output feature; a tensor-parallel rank keeps its rows (column-parallel) or the bytes of its input blocks
(row-parallel: the split must fall on block boundaries, 256 columns for K-quants, 32 otherwise). The shards of a
fused layer (q/k/v, gate/up) may have different types (Q4_K_M stores attn_v and ffn_down of some layers in Q6_K):
consecutive shards of one type share a buffer ("part") and one kernel launch, each part writing its columns of the
output, so no shard is requantized. Types without a kernel (F16, F32, Q5_0, ...) are kept dense in the model's dtype.

Block formats (what `dequantize` implements in torch and the kernels in-kernel; checked against
gguf.quants.dequantize): d, dmin and Q4_1's m are float16; a K-quant block of 256 is 8 sub-blocks of 32 (16 of 16
for Q6_K), each with its own scale (and min).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.sharding import Weight
from pagedllm.quantization.base import QuantMethod, input_columns, row_shards

# ggml's type ids (GGMLQuantizationType), a file format constant
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 8, 12, 13, 14, 30
# type -> (elements, bytes) per block, for the types with a kernel
BLOCKS: dict[int, tuple[int, int]] = {Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34), Q4_K: (256, 144),
                                      Q5_K: (256, 176), Q6_K: (256, 210)}
NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}
DENSE = -1  # a part kept as a dense weight in the model's dtype
ENV = "PAGEDLLM_GGUF_QUANTIZED"  # auto (CUDA only) | 1 (everywhere: CPU runs the torch reference) | 0 (never)


# The torch reference of each block format: float32 [rows, blocks, elements] from uint8 [rows, blocks, bytes]

def _f16(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 field at `offset` of every block, as float32 [rows, blocks, 1]."""
    return b[..., offset : offset + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., L] bytes -> [..., 2, L]: the low nibbles, then the high ones."""
    return torch.stack((qs & 15, qs >> 4), dim=-2)


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's and Q5_K's 8 six-bit scales and mins [rows, blocks, 8], packed in the 12 bytes at offset 4: sub-blocks
    0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7 in the nibbles of bytes 8-11 with their top 2
    bits in the top bits of bytes 0-3 (scales) and 4-7 (mins)."""
    s = b[..., 4:16].int()
    lo, hi = s[..., 0:4], s[..., 4:8]
    scales = torch.cat((lo & 63, (s[..., 8:12] & 15) | ((lo >> 6) << 4)), dim=-1)
    mins = torch.cat((hi & 63, (s[..., 8:12] >> 4) | ((hi >> 6) << 4)), dim=-1)
    return scales.float(), mins.float()


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    return (_nibbles(b[..., 2:18]).flatten(-2).float() - 8) * _f16(b, 0)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    return _nibbles(b[..., 4:20]).flatten(-2).float() * _f16(b, 0) + _f16(b, 2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[..., 2:34].contiguous().view(torch.int8).float() * _f16(b, 0)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    scales, mins = _k_scales(b)
    # 4 chunks of 32 bytes, each 64 elements: low nibbles (sub-block 2c), then high ones (2c + 1)
    q = _nibbles(b[..., 16:144].unflatten(-1, (4, 32))).flatten(-3, -2).float()  # [rows, blocks, 8, 32]
    w = q * (_f16(b, 0) * scales)[..., None] - (_f16(b, 2) * mins)[..., None]
    return w.flatten(-2)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    scales, mins = _k_scales(b)
    q = _nibbles(b[..., 48:176].unflatten(-1, (4, 32))).flatten(-3, -2).int()  # as Q4_K's
    high = (b[..., None, 16:48].int() >> torch.arange(8, device=b.device)[:, None]) & 1  # bit j of qh[l]: sub-block j
    w = (q | (high << 4)).float() * (_f16(b, 0) * scales)[..., None] - (_f16(b, 2) * mins)[..., None]
    return w.flatten(-2)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # two halves of 128 elements; in half n, ql[64n + 32j + l] holds elements 128n + 32j + l (low nibble) and
    # 128n + 64 + 32j + l (high), whose top 2 bits are qh[32n + l] >> 2 * (2h + j)
    ql = _nibbles(b[..., 0:128].unflatten(-1, (2, 2, 32))).transpose(-3, -2).int()  # [rows, blocks, n, h, j, l]
    qh = b[..., 128:192].unflatten(-1, (2, 1, 1, 32)).int()
    shift = 2 * torch.arange(4, device=b.device).view(2, 2, 1)
    q = (ql | (((qh >> shift) & 3) << 4)) - 32
    scales = b[..., 192:208].contiguous().view(torch.int8).float().repeat_interleave(16, dim=-1)  # one per 16
    return q.flatten(-4).float() * scales * _f16(b, 208)


_DEQUANTIZE = {Q4_0: _q4_0, Q4_1: _q4_1, Q8_0: _q8_0, Q4_K: _q4_k, Q5_K: _q5_k, Q6_K: _q6_k}


def row_bytes(qtype: int, in_features: int) -> int:
    elements, size = BLOCKS[qtype]
    if in_features % elements:
        raise ValueError(f"gguf: {NAMES[qtype]} rows hold whole blocks of {elements}; {in_features} input features.")
    return in_features // elements * size


def dequantize(raw: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
    """The float32 weight [N, K] of raw blocks uint8 [N, K / elements * bytes] (the CPU product's, and the kernels'
    reference)."""
    elements, size = BLOCKS[qtype]
    assert raw.dtype == torch.uint8 and raw.shape[-1] == row_bytes(qtype, in_features), "raw blocks [N, row bytes]"
    return _DEQUANTIZE[qtype](raw.reshape(raw.shape[0], -1, size)).reshape(raw.shape[0], in_features)


def random_blocks(qtype: int, rows: int, in_features: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Valid random blocks uint8 [rows, row bytes]: random codes and scales, with float16 d (and dmin / m) drawn so
    that weights are of the order of 0.02 (a dummy model's), never inf or NaN."""
    elements, size = BLOCKS[qtype]
    blocks = in_features // elements
    raw = torch.randint(0, 256, (rows, blocks, size), generator=generator, device=device, dtype=torch.uint8)
    # typical |code * sub-block scale| of each format, to put d where the weights come out ~0.02
    spread = {Q4_0: 8, Q4_1: 8, Q8_0: 64, Q4_K: 32 * 8, Q5_K: 32 * 16, Q6_K: 64 * 32}[qtype]
    fields = {Q4_0: (0,), Q4_1: (0, 2), Q8_0: (0,), Q4_K: (0, 2), Q5_K: (0, 2), Q6_K: (208,)}[qtype]
    for offset in fields:
        d = torch.rand((rows, blocks, 1), generator=generator, device=device) * (0.04 / spread)
        if qtype == Q4_1 and offset == 2:
            d = -d * spread / 2  # m: the block's minimum, below zero as the codes are all >= 0
        raw[..., offset : offset + 2] = d.half().view(torch.uint8)
    return raw.reshape(rows, blocks * size)


@dataclass
class GgufTensor:
    """A checkpoint's GGUF tensor (what the loader hands `load_param` instead of the converted directory's dense one):
    [rows, row bytes] blocks of `qtype` (a numpy memmap of the file, read when used, or a torch tensor), `shape` its
    (out, in) features; `heads` > 0: llama's q/k rows, whose rotary permutation (llama.cpp's converter's) is undone
    on reading, as the conversion does on the dense weight (a permutation of rows, so it works on raw blocks)."""

    qtype: int
    shape: tuple[int, int]
    data: Any
    heads: int = 0

    def read(self) -> torch.Tensor:
        """The blocks as a torch uint8 [rows, row bytes], or a dense float32 [rows, in] for a type without a kernel."""
        if self.qtype in BLOCKS:
            t = self.data if isinstance(self.data, torch.Tensor) else torch.from_numpy(np.array(self.data))
        else:
            from gguf.quants import dequantize as gguf_dequantize

            dense = gguf_dequantize(self.data, self.qtype).astype("float32", copy=False).reshape(self.shape)
            t = torch.from_numpy(dense.copy())
        if self.heads:
            from pagedllm.models.gguf import _unpermute_rotary_rows

            t = _unpermute_rotary_rows(t, self.heads)
        return t


@dataclass
class GgufPart:
    """Consecutive output rows of a layer (one or several fused shards) of one type: raw blocks, or DENSE."""

    qtype: int
    weight: torch.Tensor
    start: int
    rows: int
    dense: torch.Tensor | None = None  # the CPU reference's dequantized copy, made on first use


# llama.cpp's Q4_K_M mix (llama_tensor_get_type): attn_v and ffn_down in Q6_K on the layers `use_more_bits` picks,
# everything else Q4_K (the embedding and the LM head, Q4_K and Q6_K there, stay dense here).
_LAYER = re.compile(r"layers\.(\d+)\.")


def q4_k_m_type(checkpoint_name: str, num_layers: int) -> int:
    match = _LAYER.search(checkpoint_name)
    if match and (".v_proj." in checkpoint_name or ".down_proj." in checkpoint_name):
        i, n = int(match.group(1)), num_layers
        if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2:
            return Q6_K
    return Q4_K


class GgufLinearMethod(QuantMethod):
    name = "gguf"
    param_names = ("weight",)

    def __init__(self, source: str | None = None, num_layers: int = 0) -> None:
        """source: the .gguf file the blocks come from; None: random Q4_K_M blocks (`load_format="dummy"`) for a
        model of num_layers decoder layers."""
        super().__init__()
        self.source, self.num_layers = source, num_layers

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "source": self.source or "random Q4_K_M blocks"}

    def create_weights(self, layer: nn.Module) -> None:
        """The dense weight becomes an empty placeholder (the loader's parameter to load into); the blocks, whose size
        depends on their type, arrive per shard in `load_param`."""
        layer.orig_dtype = layer.weight.dtype
        del layer.weight
        layer.register_parameter("weight", nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False))
        layer.gguf_shards = [None] * len(row_shards(layer))

    def checkpoint_weights(self) -> dict[str, GgufTensor]:
        """HF name -> the file's raw tensor, for every decoder linear's weight: what the loader reads instead of the
        converted directory's dense copy."""
        from pagedllm.models.gguf import raw_linear_weights

        assert self.source is not None
        return raw_linear_weights(self.source)

    def random_weight(self, layer: nn.Module, checkpoint_name: str, rows: int, generator: torch.Generator
                      ) -> GgufTensor:
        """A dummy checkpoint tensor of `rows` output features: random blocks of the Q4_K_M mix's type for this name
        (the whole tensor, drawn from the loader's per-name generator, so every tensor-parallel layout holds the same
        model)."""
        k = input_columns(layer)[0]
        qtype = q4_k_m_type(checkpoint_name, self.num_layers)
        return GgufTensor(qtype, (rows, k), random_blocks(qtype, rows, k, generator, generator.device))

    def load_param(self, layer: nn.Module, name: str, param: torch.Tensor, weight: Weight, index: int) -> None:
        if not isinstance(weight, GgufTensor):
            raise ValueError(f"gguf: layer weight {name} must come from a .gguf file or dummy blocks, "
                             f"got {type(weight).__name__}.")
        rows, start, size = row_shards(layer)[index]
        k_rows, k_start, k_size = input_columns(layer)
        if weight.shape != (rows, k_rows):
            raise ValueError(f"gguf: checkpoint tensor {weight.shape} for a layer shard of {(rows, k_rows)}.")
        t = weight.read()[start : start + size]
        if weight.qtype in BLOCKS:
            elements, nbytes = BLOCKS[weight.qtype]
            if k_start % elements or k_size % elements:
                raise ValueError(f"gguf: this rank's input columns {k_start}..{k_start + k_size} do not fall on "
                                 f"{NAMES[weight.qtype]}'s blocks of {elements}; use another tensor_parallel_size.")
            t = t[:, k_start // elements * nbytes : (k_start + k_size) // elements * nbytes]
            layer.gguf_shards[index] = (weight.qtype, t.to(param.device).contiguous())
        else:
            t = t[:, k_start : k_start + k_size]
            layer.gguf_shards[index] = (DENSE, t.to(param.device, layer.orig_dtype).contiguous())

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Consecutive shards of one type become one part (one buffer, one launch)."""
        parts: list[GgufPart] = []
        start = 0
        for (qtype, t), (_, _, size) in zip(layer.gguf_shards, row_shards(layer)):
            if parts and parts[-1].qtype == qtype:
                parts[-1].weight = torch.cat((parts[-1].weight, t))
                parts[-1].rows += size
            else:
                parts.append(GgufPart(qtype, t, start, size))
            start += size
        del layer.weight, layer.gguf_shards
        layer.gguf_parts = parts

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        parts: list[GgufPart] = layer.gguf_parts
        k = layer.in_features
        x2 = x.reshape(-1, k)

        def part_bias(p: GgufPart) -> torch.Tensor | None:
            return None if bias is None else bias[p.start : p.start + p.rows]

        if not x.is_cuda:  # the torch reference (tests: CPU runs the conversion), dequantized once: a float product
            for p in parts:
                if p.dense is None or p.dense.dtype != x.dtype:
                    p.dense = p.weight.to(x.dtype) if p.qtype == DENSE else dequantize(p.weight, p.qtype, k).to(x.dtype)
            outs = [F.linear(x2, p.dense, part_bias(p)) for p in parts]
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            return out.view(*x.shape[:-1], out.shape[-1])
        from pagedllm.kernels.gguf_gemm import gguf_linear_cuda  # triton: imported only where the GPU path runs

        out = torch.empty(x2.shape[0], layer.out_features, device=x.device, dtype=x.dtype)
        for p in parts:  # each part writes its columns of the output
            view = out[:, p.start : p.start + p.rows]
            if p.qtype == DENSE:
                view.copy_(F.linear(x2, p.weight, part_bias(p)))
            else:
                gguf_linear_cuda(x2, p.weight, p.qtype, k, part_bias(p), out=view)
        return out.view(*x.shape[:-1], out.shape[-1])


def enabled_on(device: torch.device) -> bool:
    """Whether a .gguf model keeps its blocks on this device (see ENV)."""
    mode = os.environ.get(ENV, "auto")
    return mode == "1" or (mode not in ("0", "1") and device.type == "cuda")


def file_method(hf_config: Any, model_path: str, device: torch.device) -> GgufLinearMethod | None:
    """The method for a model converted from a .gguf file, where it keeps its blocks on `device`; None otherwise."""
    if not enabled_on(device):
        return None
    from pagedllm.models.gguf import gguf_source

    source = gguf_source(hf_config, model_path)
    return None if source is None else GgufLinearMethod(source, hf_config.num_hidden_layers)
