"""The worker's side of the host KV tier: every attention layer's K and V of each slot, in host memory (pinned on
CUDA), and the copies of a step (`BlockCopies`) between it and the GPU pool. A slot holds one block of every layer of
this rank: [layers, 2 (K, V), block_size, kv_heads, head_dim] in the KV cache's dtype."""

from __future__ import annotations

import torch

from pagedllm.kv_transfer.host_tier import BlockCopies


class HostKVStore:
    def __init__(self, kv_caches: list[torch.Tensor], num_slots: int) -> None:
        """kv_caches: each layer's [2, blocks, block_size, kv_heads, head_dim] pool."""
        self.kv_caches = kv_caches
        first = kv_caches[0]
        self.slot_shape = (len(kv_caches), 2, *first.shape[2:])
        pinned = first.is_cuda
        self.slots = torch.zeros((num_slots, *self.slot_shape), dtype=first.dtype, pin_memory=pinned)

    @staticmethod
    def slot_bytes(kv_caches: list[torch.Tensor]) -> int:
        first = kv_caches[0]
        return len(kv_caches) * 2 * first[0, 0].numel() * first.element_size()

    def load(self, copies: BlockCopies) -> None:
        """Host slots into GPU blocks, before the forward."""
        if not copies.loads:
            return
        slots, blocks = zip(*copies.loads)
        device = self.kv_caches[0].device
        staged = torch.empty((len(slots), *self.slot_shape), dtype=self.slots.dtype, device=device)
        for i, slot in enumerate(slots):
            staged[i].copy_(self.slots[slot], non_blocking=True)
        index = torch.tensor(blocks, dtype=torch.int64).to(device, non_blocking=True)
        for layer, kv in enumerate(self.kv_caches):
            kv.index_copy_(1, index, staged[:, layer].transpose(0, 1))

    def save(self, copies: BlockCopies) -> None:
        """GPU blocks into host slots, after the forward (stream-ordered after the writes that fill them)."""
        if not copies.saves:
            return
        blocks, slots = zip(*copies.saves)
        device = self.kv_caches[0].device
        index = torch.tensor(blocks, dtype=torch.int64).to(device, non_blocking=True)
        staged = torch.stack([kv.index_select(1, index) for kv in self.kv_caches]).permute(2, 0, 1, 3, 4, 5)
        staged = staged.contiguous()
        for i, slot in enumerate(slots):
            self.slots[slot].copy_(staged[i], non_blocking=True)
