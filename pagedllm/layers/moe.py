"""Sparse mixture-of-experts feed-forward: a replicated router picks each token's top-k experts, whose SwiGLU MLPs'
outputs are summed with the routing weights.

The experts' weights are stacked per layer (w13 [E, 2I, H]: gate rows then up rows; w2 [E, H, I]) so one fused
kernel (pagedllm/kernels/fused_moe.py) runs all experts on CUDA; on CPU a per-expert torch loop computes
transformers' sums in its order (the float32 oracle tests need token identity). Under tensor parallelism every
rank holds every expert's slice of the intermediate dimension (Megatron's split inside each expert), so the
partial outputs are summed by one all-reduce after the down projection, as a dense MLP's.

Expert parallelism (`enable_expert_parallel`) instead gives rank r of the TP group whole experts
[r * E / tp, (r + 1) * E / tp) at full intermediate size. The hidden states entering the block are replicated on
every TP rank and routing (over all E experts) is identical there, so each rank adds the contributions of its own
experts for the tokens routed to them and the same single all-reduce sums them: no all-to-all dispatch, which only
pays off with data-parallel attention (each rank holding different tokens), which pagedllm does not have.

Checkpoints store one tensor per expert and projection (`experts.{e}.gate_proj.weight`, or Mixtral's `w1`/`w3`/`w2`);
the loader maps each to its stacked parameter and an index `expert_index` encodes (see pagedllm/models/loader.py).
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.distributed.communication import tp_all_reduce
from pagedllm.distributed.parallel_state import get_parallel_state
from pagedllm.layers.linear import Linear, Shard, split_rows
from pagedllm.layers.sharding import Weight, narrow, weight_shape

GATE, UP, DOWN = 0, 1, 2  # which projection of an expert a checkpoint tensor is


def expert_index(param: str, expert: int, shard: int) -> int:
    """The loader's index for expert `expert`'s projection `shard` within stacked parameter `param` ("w13"/"w2"):
    w13 holds two tensors per expert (gate, up), w2 one."""
    return 2 * expert + shard if param == "w13" else expert


def expert_parallel_error(num_experts: int, tp: int) -> str | None:
    """Why `num_experts` experts cannot be dealt out whole over `tp` ranks (None: they can)."""
    if num_experts % tp:
        return (f"enable_expert_parallel needs the model's {num_experts} experts to divide evenly over "
                f"tensor_parallel_size={tp}.")
    return None


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 expert_parallel: bool = False) -> None:
        super().__init__()
        state = get_parallel_state()
        self.expert_parallel = expert_parallel and state.tp_size > 1
        if self.expert_parallel:
            error = expert_parallel_error(num_experts, state.tp_size)
            if error:
                raise ValueError(error)
            self.shard = Shard(intermediate_size, 0, intermediate_size)  # whole experts
        else:
            self.shard = split_rows(intermediate_size, state)
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.local_experts = num_experts // state.tp_size if self.expert_parallel else num_experts
        self.first_expert = state.tp_rank * self.local_experts if self.expert_parallel else 0
        self.hidden_size, self.tp, self.tp_size = hidden_size, state, state.tp_size
        inter, local = self.shard.size, self.local_experts
        self.w13 = nn.Parameter(torch.empty(local, 2 * inter, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(local, hidden_size, inter), requires_grad=False)

    def checkpoint_shapes(self, param: torch.Tensor) -> list[tuple[int, ...]]:
        """In `expert_index` order, all E experts' (so dummy weights are drawn alike under any layout)."""
        if param is self.w13:
            return [(self.shard.rows, self.hidden_size)] * (2 * self.num_experts)
        return [(self.hidden_size, self.shard.rows)] * self.num_experts

    def weight_loader(self, param: torch.Tensor, weight: Weight, index: int) -> None:
        expert, shard = divmod(index, 2) if param is self.w13 else (index, DOWN)
        self.load_expert(param, weight, expert, shard)

    def load_expert(self, param: torch.Tensor, weight: Weight, expert: int, shard: int) -> None:
        """This rank's rows (gate, up) or columns (down) of expert `expert`'s checkpoint tensor; nothing (and nothing
        read) for another rank's expert under expert parallelism."""
        expert -= self.first_expert
        if not 0 <= expert < self.local_experts:
            return
        s = self.shard
        expected = (self.hidden_size, s.rows) if shard == DOWN else (s.rows, self.hidden_size)
        if weight_shape(weight) != expected:
            raise ValueError(f"Shape mismatch for expert {expert} shard {shard}: checkpoint {weight_shape(weight)}, "
                             f"expected {expected}.")
        if shard == DOWN:
            param.data[expert].copy_(narrow(weight, 1, s.start, s.size))
        else:
            param.data[expert, shard * s.size : (shard + 1) * s.size].copy_(narrow(weight, 0, s.start, s.size))

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        from pagedllm.kernels.fused_moe import fused_moe, fused_moe_ref, route

        weights, ids = route(router_logits, self.top_k, self.renormalize)
        if self.expert_parallel:  # global ids -> this rank's, others -1 (they add nothing)
            ids = ids - self.first_expert
            ids = torch.where((ids >= 0) & (ids < self.local_experts), ids, -1)
        if x.is_cuda:
            out = fused_moe(x, self.w13, self.w2, weights, ids, partial=self.expert_parallel)
        else:
            out = fused_moe_ref(x, self.w13, self.w2, weights, ids)
        return out if self.tp_size == 1 else tp_all_reduce(out, self.tp)


class SparseMoeBlock(nn.Module):
    """Router (`gate`, replicated: every rank routes alike) and experts, under the checkpoints' names.
    expert_parallel: whole experts per TP rank (the model config's `enable_expert_parallel`)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, renormalize: bool,
                 expert_parallel: bool = False) -> None:
        super().__init__()
        self.gate = Linear(hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, renormalize, expert_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x))
