"""KV-cache block accounting: one pool of fixed-size blocks shared by every request.

Only the bookkeeping lives here (which physical blocks each request owns); the tensors are
allocated by the model runner as [2, num_blocks, block_size, num_kv_heads, head_dim] per layer.
A request's block table grows one block at a time as its tokens are scheduled.
"""

from __future__ import annotations

from collections import deque


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"The KV cache must hold at least one block, got {num_blocks}.")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Grows the request's table to cover `num_tokens` tokens in all; False (and no change) if the pool is short."""
        table = self.block_tables.setdefault(request_id, [])
        needed = self.blocks_for(num_tokens) - len(table)
        if needed > len(self.free_blocks):
            if not table:
                del self.block_tables[request_id]
            return False
        for _ in range(needed):
            table.append(self.free_blocks.popleft())
        return True

    def free(self, request_id: str) -> None:
        # Tail blocks first, so that (with prefix caching) a prompt's shared head outlives its tail.
        self.free_blocks.extend(reversed(self.block_tables.pop(request_id, [])))

    def get_block_table(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])
