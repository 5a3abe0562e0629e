"""Integer weights with 16-bit activations (W4A16, W8A16): the part GPTQ, AWQ and compressed-tensors' pack-quantized
share. Each format says how its checkpoint tensors read as codes, scales, zero points and group indices of one
orientation (rows = output features, unpacked: `rows_view`); everything else is here: the layer's parameters, this
rank's rows (column-parallel) or input columns (row-parallel, on group boundaries), repacking into the one layout
of int_utils.py, GPTQ act-order's column permutation, and the product.

A checkpoint tensor loads into a parameter named as in the checkpoint (`qweight`, `scales`, ...) holding this
rank's part in that layout; after loading they become one `IntWeight` (`layer.int_weight`). Random dummy weights
are 16-bit and quantized at load (round to nearest) into the same layout, so benchmarks run the real kernels.

The product: CUDA runs the Triton GEMV (up to 16 rows) or GEMM of pagedllm/kernels/int_gemm.py on the packed codes;
elsewhere (CPU) the weight is dequantized and multiplied in the activations' dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.layers.sharding import Weight, read_whole
from pagedllm.quantization import int_utils as iu
from pagedllm.quantization.base import QuantMethod, input_columns, row_shards

KINDS = ("codes", "scales", "zeros", "g_idx", "shape")


class IntWeightMethod(QuantMethod):
    name = "int"
    leaves: dict[str, str] = {}  # checkpoint leaf name -> kind (KINDS)

    def __init__(self, bits: int, group_size: int | None, symmetric: bool, serialized: bool,
                 ignore: list[str] | None = None) -> None:
        """group_size None: one scale per output row (per channel)."""
        super().__init__(ignore)
        iu.pack_factor(bits)  # validates
        if group_size is not None and (group_size <= 0 or group_size % iu.pack_factor(bits)):
            raise ValueError(f"{self.name}: group size {group_size} must be a positive multiple of "
                             f"{iu.pack_factor(bits)} for {bits}-bit weights.")
        self.bits, self.group_size, self.symmetric, self.serialized = bits, group_size, symmetric, serialized
        self.param_names = tuple(self.leaves)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "serialized": self.serialized}

    def rows_view(self, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor of `kind` as codes [N, K] (uint8), scales [N, G], zeros [N, G] (uint8), g_idx [K]."""
        raise NotImplementedError

    def _leaf(self, kind: str) -> str | None:
        return next((leaf for leaf, k in self.leaves.items() if k == kind), None)

    def _group(self, layer: nn.Module) -> int:
        """This rank's group size: a per-channel scale spans its whole input width; random weights quantized at
        load take groups no wider than the layer."""
        group = self.group_size or layer.in_features
        return group if self.serialized else min(group, layer.in_features)

    # Creation and loading

    def create_weights(self, layer: nn.Module) -> None:
        layer.orig_dtype = layer.weight.dtype
        if not self.serialized:
            return  # 16-bit weights load as usual; process_weights_after_loading quantizes them
        out, k = layer.weight.shape
        if k % iu.pack_factor(self.bits):
            raise ValueError(f"{self.name}: {k} input features per rank are not a multiple of "
                             f"{iu.pack_factor(self.bits)}, which {self.bits}-bit packing needs.")
        groups = iu.group_count(k, self._group(layer))
        shapes = {"codes": ((out, k // iu.pack_factor(self.bits)), torch.int32), "scales": ((out, groups), layer.orig_dtype),
                  "zeros": ((out, groups), torch.uint8), "g_idx": ((k,), torch.int32), "shape": ((2,), torch.int64)}
        del layer.weight
        for leaf, kind in self.leaves.items():
            shape, dtype = shapes[kind]
            layer.register_parameter(leaf, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))

    def load_param(self, layer: nn.Module, name: str, param: torch.Tensor, weight: Weight, index: int) -> None:
        kind = self.leaves[name]
        rows, start, size = row_shards(layer)[index]
        k_rows, k_start, k_size = input_columns(layer)
        full = self.rows_view(kind, read_whole(weight))
        if kind == "shape":
            if tuple(full.tolist()) != (rows, k_rows):
                raise ValueError(f"{self.name}: {name} says {tuple(full.tolist())}, the layer expects {(rows, k_rows)}.")
            return
        if kind == "g_idx":
            part = full[k_start : k_start + k_size].to(torch.int32)
            if getattr(layer, "has_g_idx", False) and not torch.equal(param.data, part):
                raise ValueError(f"{self.name}: the fused modules of one layer have different g_idx (act order).")
            param.data.copy_(part)
            layer.has_g_idx = True
            return
        part = full[start : start + size]
        if kind == "codes":
            part = iu.pack(part[:, k_start : k_start + k_size], self.bits)
        elif part.shape[1] > 1:  # grouped scales or zeros: this rank's groups
            group = self._group(layer)
            if k_start % group:
                raise ValueError(f"{self.name}: group size {group} does not divide this rank's first input column "
                                 f"{k_start}; use another tensor_parallel_size.")
            part = part[:, k_start // group : k_start // group + iu.group_count(k_size, group)]
        offset = sum(s[2] for s in row_shards(layer)[:index])
        target = param.data[offset : offset + size]
        if tuple(part.shape) != tuple(target.shape):
            raise ValueError(f"{self.name}: checkpoint {name} gives {tuple(part.shape)} for this layer's "
                             f"{tuple(target.shape)}.")
        target.copy_(part)

    # After loading

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        k, group = layer.in_features, self._group(layer)
        perm = None
        if not self.serialized:
            codes, scales, zeros = iu.quantize(layer.weight.data, self.bits, group, self.symmetric)
            packed = iu.pack(codes, self.bits)
            del layer.weight
        else:
            packed, scales = getattr(layer, self._leaf("codes")).data, getattr(layer, self._leaf("scales")).data
            zeros_leaf = self._leaf("zeros")
            if zeros_leaf is None:  # symmetric: signed codes stored with an offset of 2**(bits - 1)
                zeros = torch.full(scales.shape, 1 << (self.bits - 1), dtype=torch.uint8, device=scales.device)
            else:
                zeros = getattr(layer, zeros_leaf).data
            g_idx_leaf = self._leaf("g_idx")
            if g_idx_leaf is not None and getattr(layer, "has_g_idx", False):
                packed, perm = self._act_order(layer, packed, getattr(layer, g_idx_leaf).data, group)
            for leaf in self.leaves:
                delattr(layer, leaf)
        layer.int_weight = iu.IntWeight(packed, scales.to(layer.orig_dtype), zeros, self.bits, group, k, perm)

    def _act_order(self, layer: nn.Module, packed: torch.Tensor, g_idx: torch.Tensor, group: int
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """GPTQ's desc_act: input column k belongs to group g_idx[k], in no order. The codes' columns are sorted by
        group (so groups are contiguous again) and the activations' columns gathered the same way."""
        k_rows, k_start, k_size = input_columns(layer)
        local = g_idx.long() - k_start // group
        plain = torch.arange(k_size, device=g_idx.device) // group
        if torch.equal(local, plain):
            return packed, None
        if k_size != k_rows:
            raise ValueError(f"{self.name}: act-order (desc_act) checkpoints cannot split a layer's input features over "
                             "tensor-parallel ranks here; use tensor_parallel_size=1 or a checkpoint without desc_act.")
        perm = torch.argsort(local, stable=True)
        if not torch.equal(local[perm], plain):
            raise ValueError(f"{self.name}: g_idx does not hold {group} columns per group.")
        codes = iu.unpack(packed, self.bits)[:, perm]
        return iu.pack(codes, self.bits), perm

    # The product

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight: iu.IntWeight = layer.int_weight
        if not x.is_cuda:
            return iu.int_linear(x, weight, bias)
        from pagedllm.kernels.int_gemm import int_linear_cuda  # triton: imported only where the GPU path runs

        x2 = x.reshape(-1, x.shape[-1])
        if weight.perm is not None:
            x2 = x2.index_select(1, weight.perm)
        out = int_linear_cuda(x2, weight.packed, weight.scales, weight.zeros, weight.bits, weight.group_size,
                              weight.in_features, bias)
        return out.view(*x.shape[:-1], out.shape[-1])
