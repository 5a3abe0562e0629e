"""FP8 weights (float8_e4m3fn), optionally FP8 activations: the `fp8` method.

Weight scales: per-tensor (kept one per fused shard, then widened to one per output row: exact, no requantization
to the shards' max as vLLM's per-tensor kernels need, since the GEMM here scales rows anyway), per-channel, or
block-wise (HF's fine-grained `weight_scale_inv`, 128x128; stored expanded over the rows, [N, ceil(K/128)], so a
fused q/k/v whose parts end mid-block, and any column-parallel split, stay exact). Activations: dynamic per token,
dynamic per token and 128-column group (with block weights, as HF and vLLM), static per-tensor, or none.

CPU (and any case the GPU path does not cover) dequantizes the weight and fake-quantizes the activations: the
same math the fp8 GEMM does. CUDA (sm_89+) multiplies in fp8 through `torch._scaled_mm` with row-wise scales; products
of up to GEMV_MAX_ROWS rows (decode), where the GEMV runs, go through its fp8-weight variant instead: W8A16, the rows
left unquantized (at a few rows the weight stream is the cost, and fp8 halves it), so their outputs differ slightly
from the W8A8 GEMM's for larger batches. Larger products take their rows already in fp8 from the kernel before
them where the model declares it (`activation_producers`: the RMSNorm before q/k/v and gate/up, the SiLU-and-mul
before down: `prepare_model` wires them), else quantize them in one kernel pass (kernels/quant_rows.py). Block-wise
weights (128-column groups) multiply in the Triton block-scaled GEMM (kernels/scaled_gemm.py) on the GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.sharding import Weight, read_whole
from pagedllm.quantization import fp8_utils as fq
from pagedllm.quantization.base import QuantMethod, QuantRows, input_columns, row_shards, rows_quantization

_WEIGHT_STRATEGIES = ("tensor", "channel", "block")
_ACT_SCHEMES = (None, "token", "group", "static")


def _new(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class Fp8LinearMethod(QuantMethod):
    name = "fp8"
    weight_dtype = fq.FP8_DTYPE
    param_names = ("weight_scale", "input_scale")

    def __init__(self, weights: str = "channel", activations: str | None = "token", serialized: bool = False,
                 block: tuple[int, int] = (128, 128), ignore: list[str] | None = None) -> None:
        """serialized: the checkpoint holds fp8 weights and their scales; else 16-bit weights are quantized at load
        (per channel, or block-wise for a block format's random dummy weights)."""
        super().__init__(ignore)
        if weights not in _WEIGHT_STRATEGIES or activations not in _ACT_SCHEMES:
            raise ValueError(f"fp8: unsupported weight strategy {weights!r} / activation scheme {activations!r}.")
        if activations == "static" and not serialized:
            raise ValueError("fp8: static activation scales come from a checkpoint; quantizing at load needs dynamic ones.")
        self.weights, self.activations, self.serialized, self.block = weights, activations, serialized, tuple(block)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "weights": self.weights, "activations": self.activations, "serialized": self.serialized}

    # Creation and loading

    def create_weights(self, layer: nn.Module) -> None:
        layer.orig_dtype = layer.weight.dtype
        if not self.serialized:
            return  # 16-bit weights load as usual; process_weights_after_loading quantizes them
        out, k = layer.weight.shape
        layer.weight = _new((out, k), self.weight_dtype)
        n = len(row_shards(layer))
        if self.weights == "channel":
            layer.weight_scale = _new((out, 1))
        elif self.weights == "tensor":
            layer.weight_scale = _new((n,))
        else:
            layer.weight_scale = _new((out, -(-k // self.block[1])))
        if self.activations == "static":
            layer.input_scale = _new((n,))

    def load_param(self, layer: nn.Module, name: str, param: torch.Tensor, weight: Weight, index: int) -> None:
        value = read_whole(weight).float()
        if name == "input_scale" or self.weights == "tensor":
            if value.numel() != 1:
                raise ValueError(f"fp8: {name} of {tuple(value.shape)} where a per-tensor scalar was expected.")
            param.data[index] = value.reshape(())  # a row-parallel or plain layer has one shard, index 0
            return
        rows, start, size = row_shards(layer)[index]
        offset = sum(s[2] for s in row_shards(layer)[:index])
        if self.weights == "channel":
            if value.numel() != rows:
                raise ValueError(f"fp8: per-channel weight_scale of {tuple(value.shape)} for {rows} output rows.")
            param.data[offset : offset + size, 0] = value.reshape(-1)[start : start + size]
        else:
            param.data[offset : offset + size] = self._block_rows(layer, value, rows, start, size)

    def _block_rows(self, layer: nn.Module, grid: torch.Tensor, rows: int, start: int, size: int) -> torch.Tensor:
        """This rank's rows [start, start + size) of a checkpoint's block grid, each row given its block's scales; a
        row-parallel layer also takes its input columns' blocks, which must start on a block boundary."""
        bn, bk = self.block
        k_rows, k_start, k_size = input_columns(layer)
        if tuple(grid.shape) != (-(-rows // bn), -(-k_rows // bk)):
            raise ValueError(f"fp8: weight_scale_inv grid {tuple(grid.shape)} does not match a [{rows}, {k_rows}] weight "
                             f"in {bn}x{bk} blocks.")
        if k_start % bk:
            raise ValueError(f"fp8: block-wise scales need tensor-parallel splits of the input features on multiples of "
                             f"{bk}; this rank's columns start at {k_start}. Use another tensor_parallel_size.")
        cols = grid[:, k_start // bk : k_start // bk + -(-k_size // bk)]
        return cols[torch.arange(start, start + size) // bn]

    # After loading

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight.data
        out, k = weight.shape
        if not self.serialized:
            if self.weights == "block":
                q, grid = fq.quantize_blocks(weight, *self.block)
                scale = grid.repeat_interleave(self.block[0], dim=0)[:out]
            else:
                q, scale = self.quantize_per_channel(weight)
            layer.weight, layer.weight_scale = _new(q.shape, q.dtype), _new(scale.shape)
            layer.weight.data, layer.weight_scale.data = q, scale
        elif self.weights == "tensor":  # one scalar per fused shard -> one per output row
            sizes = [s[2] for s in row_shards(layer)]
            sizes_t = torch.tensor(sizes, device=weight.device)
            layer.weight_scale.data = layer.weight_scale.data.repeat_interleave(sizes_t).view(out, 1)
        if self.activations == "static":  # the fused shards share their input: one scale, the largest
            layer.input_scale.data = layer.input_scale.data.max().reshape(())
        layer.fp8_gemm = self._gpu_gemm_applies(layer)
        if layer.fp8_gemm == "rows":
            layer.weight_scale_row = layer.weight_scale.data.reshape(1, out).contiguous()

    def quantize_per_channel(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fq.quantize_per_channel(weight)

    def _gpu_gemm_applies(self, layer: nn.Module) -> str | None:
        """The GPU's fp8 product, Ada/Hopper+ with bf16 outputs: "rows" (torch._scaled_mm, row-wise scales: per-row
        weight scales, per-token or static activations) or "blocks" (the Triton GEMM: 128-column groups of weights
        and activations); None: dequantize (CPU, other dtypes and schemes)."""
        w = layer.weight
        if not (w.is_cuda and layer.orig_dtype == torch.bfloat16 and torch.cuda.get_device_capability(w.device) >= (8, 9)):
            return None
        if self.weights != "block" and self.activations in ("token", "static"):
            return "rows"
        if self.weights == "block" and self.activations == "group" and self.block[1] == 128:
            return "blocks"
        return None

    def takes_quant_rows(self, layer: nn.Module) -> bool:
        """Whether the layer's GEMM takes rows quantized per token (QuantRows of weight_dtype) from the kernel before."""
        return getattr(layer, "fp8_gemm", None) == "rows" and self.activations == "token"

    def prepare_model(self, model: nn.Module) -> None:
        """Every (producer, linear) pair a model module declares in `activation_producers` (names relative to it)
        whose linear takes QuantRows: the producer (RMSNorm, SiluAndMul) then quantizes its own output."""
        for module in model.modules():
            for producer_name, consumer_name in getattr(module, "activation_producers", ()):
                try:
                    producer, consumer = module.get_submodule(producer_name), module.get_submodule(consumer_name)
                except AttributeError:  # another block in its place (an MoE layer's), or another pipeline stage's
                    continue
                if consumer.quant_method is self and self.takes_quant_rows(consumer) and hasattr(producer, "quant_rows"):
                    producer.quant_rows = self.weight_dtype

    # The product

    def dequantize(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        scale = layer.weight_scale
        if self.weights == "block":
            scale = scale.repeat_interleave(self.block[1], dim=1)[:, : layer.weight.shape[1]]
        return (layer.weight.float() * scale).to(dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor | QuantRows, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, QuantRows):  # quantized by the kernel before (prepare_model)
            return self.rows_product(layer, x.q, x.scale, bias, layer.orig_dtype)
        if layer.fp8_gemm == "rows":
            return self._apply_rows(layer, x, bias)
        if layer.fp8_gemm == "blocks":
            from pagedllm.kernels.quant_rows import quantize_rows
            from pagedllm.kernels.scaled_gemm import scaled_gemm

            xq, sx = quantize_rows(x.reshape(-1, x.shape[-1]), group=128)
            out = scaled_gemm(xq, sx, layer.weight, layer.weight_scale, bias, out_dtype=x.dtype)
            return out.view(*x.shape[:-1], out.shape[-1])
        if self.activations is not None:
            x = fq.fake_quantize(x, self.activations, getattr(layer, "input_scale", None), self.block[1])
        return F.linear(x, self.dequantize(layer, x.dtype), bias)

    def rows_product(self, layer: nn.Module, xq: torch.Tensor, sx: torch.Tensor, bias: torch.Tensor | None,
                     out_dtype: torch.dtype) -> torch.Tensor:
        """Quantized rows [M, K] with their scales [M, 1] x the weight, scaled per row: cuBLASLt's fp8 GEMM."""
        return torch._scaled_mm(xq, layer.weight.t(), scale_a=sx, scale_b=layer.weight_scale_row, bias=bias,
                                out_dtype=out_dtype)

    def quantize_input(self, layer: nn.Module, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.activations == "static":
            sx = layer.input_scale.reshape(1, 1).expand(x2.shape[0], 1).contiguous()
            return fq.quantize(x2, layer.input_scale), sx
        from pagedllm.kernels.quant_rows import quantize_rows

        return quantize_rows(x2, self.weight_dtype)

    def _apply_rows(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Per-token (or static) 8-bit activations x the weight, both scaled per row. Up to GEMV_MAX_ROWS rows: the
        8-bit-weight GEMV (W8A16) with the same per-row weight scales, per-tensor ones already widened to rows; the
        activation scheme (and a static input_scale) is not applied there."""
        x2 = x.reshape(-1, x.shape[-1])
        if rows_quantization(self.weight_dtype, x2) is None and x2.stride(1) == 1:
            from pagedllm.kernels.gemv import gemv  # triton: imported only where the GPU path runs

            out = gemv(x2, layer.weight, bias, weight_scale=layer.weight_scale_row)
        else:
            out = self.rows_product(layer, *self.quantize_input(layer, x2), bias, x.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])


def from_config(quant_config: dict[str, Any] | None, serialized: bool) -> Fp8LinearMethod:
    """`--quantization fp8` on a 16-bit checkpoint (quant_config None): per-channel weights, per-token activations.
    Else a checkpoint's `quant_method: fp8` config: HF fine-grained (weight_block_size, weight_scale_inv, dynamic
    per-group activations) or per-tensor (weight_scale / weight_scale_inv scalars, activation_scheme static|dynamic)."""
    if quant_config is None:
        return Fp8LinearMethod("channel", "token", serialized=False)
    scheme = quant_config.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"fp8: unsupported activation_scheme {scheme!r} (dynamic, static).")
    block = quant_config.get("weight_block_size")
    ignore = list(quant_config.get("modules_to_not_convert") or quant_config.get("ignored_layers") or [])
    if quant_config.get("scale_fmt", "float") != "float":
        raise ValueError(f"fp8: unsupported scale_fmt {quant_config['scale_fmt']!r} (float).")
    if block is not None:
        if len(block) != 2 or scheme != "dynamic":
            raise ValueError(f"fp8: weight_block_size {block} needs two sizes and dynamic activations.")
        return Fp8LinearMethod("block", "group", serialized=serialized, block=tuple(block), ignore=ignore)
    # A dynamic per-tensor checkpoint's activations are quantized per token here: finer, and what the GEMM scales by.
    weights = "tensor" if serialized else "channel"
    acts = "static" if scheme == "static" and serialized else "token"
    return Fp8LinearMethod(weights, acts, serialized=serialized, ignore=ignore)
