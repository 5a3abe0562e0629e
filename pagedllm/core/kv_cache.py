"""KV-cache block accounting: one pool of fixed-size blocks shared by every request.

Only the bookkeeping lives here (which physical blocks each request owns); the tensors are
allocated by the model runner as [2, num_blocks, block_size, num_kv_heads, head_dim] per layer.
A request's block table grows one block at a time as its tokens are scheduled.

The tables are also mirrored, one row per request that holds blocks, in a numpy array that grows
with them (`table_array`, zero past each table's end): the runner gathers a step's block tables
from it in one indexing op, whatever the context lengths.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, max_blocks_per_seq: int = 16) -> None:
        if num_blocks < 1:
            raise ValueError(f"The KV cache must hold at least one block, got {num_blocks}.")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.block_tables: dict[str, list[int]] = {}
        self.table_rows: dict[str, int] = {}  # request -> its row of table_array
        self.table_array = np.zeros((16, max(1, max_blocks_per_seq)), dtype=np.int32)
        self._free_rows = list(range(15, -1, -1))

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
        table = self.block_tables.get(request_id)
        have = 0 if table is None else len(table)
        needed = self.blocks_for(num_tokens) - have
        if needed <= 0:
            return True
        if needed > len(self.free_blocks):
            return False
        if table is None:
            table = self.block_tables[request_id] = []
            self.table_rows[request_id] = self._take_row()
        new = [self.free_blocks.popleft() for _ in range(needed)]
        table.extend(new)
        if len(table) > self.table_array.shape[1]:
            self._grow(cols=max(len(table), 2 * self.table_array.shape[1]))
        self.table_array[self.table_rows[request_id], have : len(table)] = new
        return True

    def free(self, request_id: str) -> None:
        table = self.block_tables.pop(request_id, None)
        if table is None:
            return
        row = self.table_rows.pop(request_id)
        self.table_array[row, : len(table)] = 0
        self._free_rows.append(row)
        # Tail blocks first, so that (with prefix caching) a prompt's shared head outlives its tail.
        self.free_blocks.extend(reversed(table))

    def get_block_table(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])

    def _take_row(self) -> int:
        if not self._free_rows:
            rows = self.table_array.shape[0]
            self._grow(rows=2 * rows)
            self._free_rows = list(range(2 * rows - 1, rows - 1, -1))
        return self._free_rows.pop()

    def _grow(self, rows: int | None = None, cols: int | None = None) -> None:
        old = self.table_array
        self.table_array = np.zeros((rows or old.shape[0], cols or old.shape[1]), dtype=np.int32)
        self.table_array[: old.shape[0], : old.shape[1]] = old
