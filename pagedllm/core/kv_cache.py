"""KV-cache bookkeeping: which physical blocks each request reads and writes, and prefix caching.

Only the bookkeeping lives here; the tensors are allocated by the model runner as
[2, num_blocks, block_size, num_kv_heads, head_dim] per layer. A request's block table grows
one block at a time as its tokens are scheduled.

Prefix caching: every full block of a request gets a hash chained from its parent block's hash
and its token ids (the first block's parent is the request's cache salt, if any), and is
registered in the pool under that hash as soon as the step that computes it is scheduled. A new
request walks its tokens block by block and takes every block it finds, so only the rest is
prefilled. Only full blocks are shared, and a hit never covers a request's last token (it must
run to be sampled), so a request writes only into blocks it alone holds.

A block registered while the step that writes it is still to run is safe to share: a reader in a
later step runs after it on the same stream, and a reader in the same step reads it after the
layer's K/V write, which comes before attention in every layer.

Sliding windows: where every layer attends only the last W positions (Mistral), the blocks wholly before the
window of the request's next position go back to the pool as it advances, so a long generation holds about W
tokens of blocks. Their table entries stay (stale: the attention kernels start at the window, and a masked read of
a pool block, zero-initialised or another request's, is finite and weighs nothing).

The tables are also mirrored, one row per request that holds blocks, in a numpy array that grows
with them (`table_array`, zero past each table's end): the runner gathers a step's block tables
from it in one indexing op, whatever the context lengths.
"""

from __future__ import annotations

import hashlib
from array import array

import numpy as np

from pagedllm.core.block_pool import BlockHash, BlockPool
from pagedllm.kv_transfer.host_tier import BlockCopies, HostTier
from pagedllm.engine.request import Request


def hash_block(parent: BlockHash, token_ids: list[int], extra: bytes = b"") -> BlockHash:
    # 128 bits: accidental collisions are out of reach; the salt keeps tenants from probing each other.
    # extra: the hashes of the images the block's tokens stand for (the same placeholders, another image).
    return hashlib.blake2b(parent + array("q", token_ids).tobytes() + extra, digest_size=16).digest()


def _root(request: Request) -> BlockHash:
    """The first block's parent: the cache salt and the LoRA adapter, so that only requests with both alike share."""
    lora = request.lora_request
    return ((request.cache_salt or "") + ("" if lora is None else f"\x00lora:{lora.lora_int_id}")).encode()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, max_blocks_per_seq: int = 16, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None, host_tier: HostTier | None = None) -> None:
        """host_tier: the prefix cache's second tier in host memory (kv_transfer/host_tier.py), or None."""
        self.pool = BlockPool(num_blocks)
        self.host_tier = host_tier if enable_prefix_caching else None
        self.sliding_window = sliding_window
        self.num_released: dict[str, int] = {}  # request -> leading blocks of its table given back (outside the window)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_tables: dict[str, list[int]] = {}
        self.num_hashed: dict[str, int] = {}  # request -> how many leading blocks of its table are registered
        self.table_rows: dict[str, int] = {}  # request -> its row of table_array
        self.table_array = np.zeros((16, max(1, max_blocks_per_seq)), dtype=np.int32)
        self._free_rows = list(range(15, -1, -1))
        self.prefix_queries = self.prefix_hits = 0  # tokens looked up / found, over all admissions

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.pool.num_free

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix caching -------------------------------------------------------------------
    def find_cached_blocks(self, request: Request) -> list[int]:
        """The cached blocks that hold the longest run of the request's leading full blocks."""
        if not self.enable_prefix_caching or request.prompt_logprobs is not None or (
                request.pooling is not None and request.pooling.needs_every_row):
            return []  # prompt logprobs, and MEAN / CLS pooling, need every prompt position computed
        limit = (len(request.all_token_ids) - 1) // self.block_size
        blocks: list[int] = []
        hashes = self._hashes(request, limit)
        for block_hash in hashes:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            blocks.append(block)
        if self.host_tier is not None and len(blocks) < len(hashes):
            self._restore_from_host(hashes[len(blocks) :], blocks)
        return blocks

    def _restore_from_host(self, hashes: list[BlockHash], blocks: list[int]) -> None:
        """Extends `blocks` (GPU hits) with the host tier's run of `hashes`: each takes a GPU block that the step
        loads before its forward, registered like any cached block (free, at the queue's tail)."""
        tier = self.host_tier
        assert tier is not None
        self.pool.touch(blocks)  # the GPU hits must not be the blocks taken below
        restored: list[int] = []
        for block_hash in hashes:
            tier.queries += self.block_size
            slot = tier.lookup(block_hash)
            if slot is None or self.pool.num_free == 0:
                break
            block = self.pool.take(1)[0]
            self.pool.cache(block, block_hash)
            tier.load(slot, block)
            tier.hits += self.block_size
            restored.append(block)
        self.pool.release(blocks + restored)
        blocks.extend(restored)

    def prompt_block_hashes(self, request: Request) -> list[BlockHash]:
        """The hashes of the prompt's full blocks a prefix-cache lookup may hit (all but the last token's)."""
        return self._hashes(request, (len(request.all_token_ids) - 1) // self.block_size)

    def take_copies(self) -> BlockCopies | None:
        """The host-tier copies of the step being scheduled (None: none, or no tier)."""
        return None if self.host_tier is None else self.host_tier.take_copies()

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        if self.enable_prefix_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += num_hit_tokens

    def cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Registers the request's blocks that are full once its first `num_tokens` tokens are
        computed (those whose token ids are all known)."""
        if not self.enable_prefix_caching:
            return
        request_id = request.request_id
        done = self.num_hashed.get(request_id, 0)
        full = min(num_tokens, len(request.all_token_ids)) // self.block_size
        if full <= done:
            return
        table = self.block_tables[request_id]
        tier = self.host_tier
        for i, block_hash in enumerate(self._hashes(request, full)[done:full], done):
            self.pool.cache(table[i], block_hash)
            if tier is not None:  # write-through: saved to the host after the step that computes it
                tier.save(table[i], block_hash)
        self.num_hashed[request_id] = full

    def _hashes(self, request: Request, count: int) -> list[BlockHash]:
        """The chained hashes of the request's first `count` full blocks, extended as needed."""
        hashes, size, ids = request.block_hashes, self.block_size, request.all_token_ids
        count = min(count, len(ids) // size)
        while len(hashes) < count:
            i = len(hashes)
            parent = hashes[-1] if hashes else _root(request)
            extra = b"" if request.mm is None else request.mm.block_keys(i * size, (i + 1) * size)
            hashes.append(hash_block(parent, ids[i * size : (i + 1) * size], extra))
        return hashes

    def reset_prefix_cache(self) -> None:
        self.pool.reset()

    # ---- tables ---------------------------------------------------------------------------
    def allocate_slots(self, request_id: str, num_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Grows the request's table to cover `num_tokens` tokens in all, starting (for a request
        with no blocks yet) with `cached_blocks`; False, and no change, if the pool is short."""
        table = self.block_tables.get(request_id)
        have = 0 if table is None else len(table)
        cached = cached_blocks or []
        needed = self.blocks_for(num_tokens) - have - len(cached)
        if needed <= 0 and not cached:
            return True
        # A hit on a block nobody holds takes it out of the free queue too.
        revived = sum(1 for b in cached if self.pool.ref_counts[b] == 0)
        if max(needed, 0) + revived > self.pool.num_free:
            return False
        if table is None:
            table = self.block_tables[request_id] = []
            self.table_rows[request_id] = self._take_row()
            self.num_hashed[request_id] = len(cached)
        self.pool.touch(cached)
        new = cached + self.pool.take(max(needed, 0))
        table.extend(new)
        if len(table) > self.table_array.shape[1]:
            self._grow(cols=max(len(table), 2 * self.table_array.shape[1]))
        self.table_array[self.table_rows[request_id], have : len(table)] = new
        return True

    def release_outside_window(self, request_id: str, num_computed: int) -> None:
        """With a sliding window W: gives back the request's blocks whose keys no query at a position >= num_computed
        sees (it sees (p - W, p])."""
        assert self.sliding_window is not None
        count = (num_computed - self.sliding_window + 1) // self.block_size
        done = self.num_released.get(request_id, 0)
        if count > done:
            self.pool.release(self.block_tables[request_id][done:count])
            self.num_released[request_id] = count

    def free(self, request_id: str) -> None:
        table = self.block_tables.pop(request_id, None)
        if table is None:
            return
        del self.num_hashed[request_id]
        row = self.table_rows.pop(request_id)
        self.table_array[row, : len(table)] = 0
        self._free_rows.append(row)
        # Tail blocks first: a shared prompt head is more likely to be asked for again than a tail.
        self.pool.release(reversed(table[self.num_released.pop(request_id, 0) :]))

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
