"""The physical KV blocks: reference counts, content hashes, and the free queue they are taken from.

A block is in use while some request's table holds it (ref count > 0). A block whose count drops
to zero goes to the free queue but keeps its hash, so a later request with the same tokens can
take it back (a prefix-cache hit) until it is needed for something else. The queue is in eviction
order: blocks with nothing worth keeping first, then cached blocks least recently freed first.
An OrderedDict gives O(1) pops from the head, appends, and removal from the middle on a hit.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

BlockHash = bytes


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"The KV cache must hold at least one block, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[BlockHash | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}  # hash -> the block holding those tokens
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_evictions = 0  # cached blocks overwritten for new tokens

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def take(self, count: int) -> list[int]:
        """`count` blocks for new tokens, evicting cached ones (their hashes are dropped) if they come next."""
        blocks = []
        for _ in range(count):
            block, _ = self.free_queue.popitem(last=False)
            self._uncache(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[int]) -> None:
        """Another reference to cached blocks (a prefix hit): out of the free queue if they were there."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
            self.ref_counts[block] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """Drops one reference to each block, in the order given (the order they become evictable)."""
        for block in blocks:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
                if self.block_hashes[block] is None:  # nothing to keep: reuse it first
                    self.free_queue.move_to_end(block, last=False)

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self.cached.get(block_hash)

    def cache(self, block: int, block_hash: BlockHash) -> None:
        """Marks a full block as holding the tokens behind `block_hash`. If another block already
        holds them (two requests computed the same prefix at once), this one stays private."""
        if block_hash not in self.cached:
            self.cached[block_hash] = block
            self.block_hashes[block] = block_hash

    def reset(self) -> None:
        """Forgets every hash: blocks in use stay valid, but no later request will find them."""
        self.cached.clear()
        self.block_hashes = [None] * self.num_blocks

    def _uncache(self, block: int) -> None:
        block_hash = self.block_hashes[block]
        if block_hash is not None:
            del self.cached[block_hash]
            self.block_hashes[block] = None
            self.num_evictions += 1

    def check(self) -> None:
        """Asserts the pool's invariants (for tests)."""
        assert all(self.block_hashes[b] == h for h, b in self.cached.items())
        assert sum(h is not None for h in self.block_hashes) == len(self.cached)
        assert all(self.ref_counts[b] == 0 for b in self.free_queue)
        assert sum(c > 0 for c in self.ref_counts) == self.num_blocks - self.num_free
        assert min(self.ref_counts) >= 0
