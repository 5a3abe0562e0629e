"""Linear layers. On CPU in float32 they multiply through MKL's pre-packed copy of the weight:
bit-for-bit the same sums as `F.linear` (the oracle tests hold), about 1.5x faster at decode
batch sizes, where re-packing the weight on every call is a large share of the work.

On Hopper and later GPUs, half-precision products of up to 16 rows (decode batches) run through
`pagedllm.kernels.gemv`, which starts streaming the weight before the kernel before it has finished:
Llama-3-8B's o_proj at 1 row 9.6 us against cuBLAS's 12.4, Qwen3-0.6B's 2.4 against 5.9 (one H200,
benchmarks/RESULTS.md, sessions 10-11). There every weight is row-major, the GEMV's layout. Elsewhere
(older GPUs, float32) the row-parallel layers (o_proj, down_proj) keep their weight column-major, so
cuBLAS runs them as NN products: at 1-4 rows its TN kernel for Qwen3-0.6B's o_proj takes 8-12.6 us where
the NN one takes 5.7, and at 1-512 rows NN is at most 0.7 % slower on these layers of Qwen3-0.6B and
Llama-3-8B (session 7). The column-parallel layers stay row-major: there NN loses up to 1.5x at some row
counts (Llama-3-8B's gate_up at 128 rows).

Tensor parallelism is Megatron's: a column-parallel layer (fused QKV, gate/up) keeps each rank's
rows of every checkpoint tensor fused into it, so its output needs no communication; the
row-parallel layer after it (o_proj, down_proj) multiplies the matching input columns and sums
the partial products with one all-reduce. With one rank both are plain `Linear`s.

A layer given a quantization method (pagedllm/quantization/) holds what that method creates (fp8 weights and
their scales, say) and multiplies through its `apply`, bound in place of `product` once the weights are loaded,
so unquantized layers run exactly the code they ran before.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.distributed.communication import tp_all_reduce
from pagedllm.distributed.parallel_state import ParallelState, get_parallel_state
from pagedllm.layers.sharding import Weight, load_whole, narrow, weight_shape

if TYPE_CHECKING:
    from pagedllm.quantization.base import QuantMethod

_PACK_BATCH_HINT = 64  # MKL packs for a typical row count; any row count works with the result
GEMV_MAX_ROWS = 16


def _can_pack(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkl.is_available()


@functools.cache
def gemv_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether products of few rows run through `pagedllm.kernels.gemv`: half precision (float32 keeps
    cuBLAS, the GPU oracle runs' path) on a GPU with programmatic dependent launch, which is what makes
    the kernel faster than cuBLAS. PAGEDLLM_GEMV=0 turns it off. Decided once per process (as
    `pdl_options` is), so the weight layout chosen at load time and every later product agree."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or os.environ.get("PAGEDLLM_GEMV", "1") == "0":
        return False
    from pagedllm.kernels import pdl_options

    return pdl_options(device)["USE_PDL"]


def takes_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """At most GEMV_MAX_ROWS rows and a row-major weight, where `gemv_enabled`."""
    return (
        x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS and weight.dtype == x.dtype and weight.stride(1) == 1
        and x.stride(1) == 1 and gemv_enabled(x.device, x.dtype)
    )


class Linear(nn.Linear):
    packed_weight: torch.Tensor | None = None
    quant_method: QuantMethod | None = None

    def set_quant_method(self, method: QuantMethod) -> None:
        """Before loading (on the meta device): the method replaces the weight with its own parameters."""
        self.quant_method = method
        method.create_weights(self)

    def pack(self) -> None:
        """Call after the weights are final (loaded); later weight changes need another pack()."""
        if self.quant_method is not None:  # its weights converted once, its product from now on
            self.quant_method.process_weights_after_loading(self)
            self.product = functools.partial(self.quant_method.apply, self)  # type: ignore[method-assign]
            return
        if _can_pack(self.weight):
            self.packed_weight = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), _PACK_BATCH_HINT)

    def product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed_weight is not None and x.dim() == 2 and x.dtype == torch.float32:
            return torch.ops.mkl._mkl_linear(x, self.packed_weight, self.weight, bias, _PACK_BATCH_HINT)
        if takes_gemv(x, self.weight):
            from pagedllm.kernels.gemv import gemv

            return gemv(x, self.weight, bias)
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x, self.bias)


def pack_linear_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, Linear):
            module.pack()


@dataclass(frozen=True)
class Shard:
    """The rows of one checkpoint tensor that this rank holds."""

    rows: int  # the tensor's full row count
    start: int
    size: int


def split_rows(rows: int, state: ParallelState, unit: int = 1) -> Shard:
    """This rank's rows, in whole units (a head's rows, say): an even split where the units divide
    evenly, else the first ranks take one unit more."""
    tp, rank = state.tp_size, state.tp_rank
    units = rows // unit
    if rows % unit or units < tp:
        raise ValueError(f"{units} units of {unit} features cannot be split over tensor_parallel_size={tp}.")
    base, extra = divmod(units, tp)
    return Shard(rows, (rank * base + min(rank, extra)) * unit, (base + (rank < extra)) * unit)


def tp_layout_error(tp: int, num_heads: int, num_kv_heads: int, intermediate_size: int | None = None) -> str | None:
    """Why attention heads and MLP rows cannot be split over `tp` ranks (None: they can)."""
    if num_kv_heads < tp and (num_heads % tp or tp % num_kv_heads):
        return (f"tensor_parallel_size={tp} exceeds the model's {num_kv_heads} KV heads, so it must divide its {num_heads} "
                "attention heads and be a multiple of the KV heads.")
    if intermediate_size is not None and intermediate_size < tp:
        return f"tensor_parallel_size={tp} exceeds the model's intermediate size {intermediate_size}."
    return None


def qkv_shards(head_dim: int, num_heads: int, num_kv_heads: int) -> list[Shard]:
    """This rank's q heads, and its k/v heads. With at least as many KV heads as ranks, each rank takes
    whole KV heads (as evenly as they go: SmolLM2's 3 over 2 ranks are 2 + 1) with the q heads that
    attend to them; with fewer, the q heads split evenly and each rank keeps the one KV head its q heads
    attend to (replicated over tp_size // num_kv_heads ranks)."""
    state = get_parallel_state()
    tp, rank = state.tp_size, state.tp_rank
    if num_kv_heads >= tp:
        kv = split_rows(num_kv_heads * head_dim, state, head_dim)
        group = num_heads // num_kv_heads
        q = Shard(num_heads * head_dim, kv.start * group, kv.size * group)
        return [q, kv, kv]
    error = tp_layout_error(tp, num_heads, num_kv_heads)
    if error:
        raise ValueError(error)
    q = split_rows(num_heads * head_dim, state, head_dim)
    kv = Shard(num_kv_heads * head_dim, rank // (tp // num_kv_heads) * head_dim, head_dim)
    return [q, kv, kv]


class ColumnParallelLinear(Linear):
    """Output features split over the TP group: this rank's `Shard` of each checkpoint tensor fused
    here (q, k, v or gate, up), side by side in that order."""

    def __init__(self, in_features: int, shards: list[Shard], bias: bool) -> None:
        super().__init__(in_features, sum(s.size for s in shards), bias)
        self.shards = shards

    def checkpoint_shapes(self, param: torch.Tensor) -> list[tuple[int, ...]]:
        return [(s.rows, *param.shape[1:]) for s in self.shards]

    def weight_loader(self, param: torch.Tensor, weight: Weight, index: int) -> None:
        shard = self.shards[index]
        if weight_shape(weight) != (shard.rows, *param.shape[1:]):
            raise ValueError(f"Shape mismatch for shard {index}: checkpoint {weight_shape(weight)}, expected {(shard.rows, *param.shape[1:])}.")
        offset = sum(s.size for s in self.shards[:index])
        param.data[offset : offset + shard.size].copy_(narrow(weight, 0, shard.start, shard.size))


class RowParallelLinear(Linear):
    """Input features split over the TP group; the partial outputs are summed by one all-reduce.
    The bias is added on TP rank 0 only, so the sum holds it once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, shard: Shard | None = None) -> None:
        """`shard`: this rank's input columns, where the layer before split its outputs unevenly."""
        state = get_parallel_state()
        shard = shard or split_rows(in_features, state)
        super().__init__(shard.size, out_features, bias)
        self.shard, self.tp, self.tp_size, self.tp_rank = shard, state, state.tp_size, state.tp_rank

    def pack(self) -> None:
        if self.quant_method is None and self.weight.is_cuda and not gemv_enabled(self.weight.device, self.weight.dtype):
            self.weight.data = self.weight.data.t().contiguous().t()  # column-major: see the module's docstring
        super().pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.product(x, self.bias if self.tp_rank == 0 else None)
        return out if self.tp_size == 1 else tp_all_reduce(out, self.tp)

    def checkpoint_shapes(self, param: torch.Tensor) -> list[tuple[int, ...]]:
        return [(self.out_features, self.shard.rows) if param.dim() == 2 else (self.out_features,)]

    def weight_loader(self, param: torch.Tensor, weight: Weight, index: int) -> None:
        if param.dim() == 1:  # the bias is whole on every rank
            load_whole(param, weight, "bias")
            return
        if weight_shape(weight) != (self.out_features, self.shard.rows):
            raise ValueError(f"Shape mismatch: checkpoint {weight_shape(weight)}, expected {(self.out_features, self.shard.rows)}.")
        param.data.copy_(narrow(weight, 1, self.shard.start, self.shard.size))
