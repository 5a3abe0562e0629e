"""The scheduler's side of the host-memory KV tier: which block hashes sit in which host slot, least recently used
first, and the copies the next step must make.

Write-through: when a full block is registered in the prefix cache (its step is being scheduled), the step also saves
it to a host slot after its forward, unless the tier holds those tokens already. A prefix-cache lookup that misses the
GPU pool goes on in the tier: each hit takes a GPU block, registers the hash there, and the step loads it before its
forward, so the request starts past it as past any cached block. Copies run in the order recorded, loads before the
forward and saves after it, on the device's stream: a slot is never read before the save that fills it.

The tier is thread-safe for readers (a KV transfer server, kv_transfer/tcp.py): slots are read under the lock, and
only once the step that saved them has finished (`mark_saved`)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

BlockHash = bytes


@dataclass
class BlockCopies:
    """One step's copies between GPU blocks and host slots (broadcast to every rank, which holds its own shard)."""

    loads: list[tuple[int, int]] = field(default_factory=list)  # (host slot, GPU block), before the forward
    saves: list[tuple[int, int]] = field(default_factory=list)  # (GPU block, host slot), after the forward

    def __bool__(self) -> bool:
        return bool(self.loads or self.saves)


class HostTier:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"the host KV tier must hold at least one block, got {num_slots}.")
        self.num_slots = num_slots
        self.slots: OrderedDict[BlockHash, int] = OrderedDict()  # least recently used first
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.saved: set[int] = set()  # slots whose save has finished (safe to read from the host)
        self.pending = BlockCopies()
        self.lock = threading.Lock()
        self.hits = self.queries = 0  # tokens found in / looked up in the tier (after a GPU miss)

    def __len__(self) -> int:
        return len(self.slots)

    def save(self, block: int, block_hash: BlockHash) -> None:
        """A block just registered in the prefix cache: copied to a slot after this step's forward."""
        with self.lock:
            if block_hash in self.slots:
                self.slots.move_to_end(block_hash)
                return
            if self.free_slots:
                slot = self.free_slots.pop()
            else:
                _, slot = self.slots.popitem(last=False)
                self.saved.discard(slot)
            self.slots[block_hash] = slot
            self.pending.saves.append((block, slot))

    def lookup(self, block_hash: BlockHash) -> int | None:
        with self.lock:
            slot = self.slots.get(block_hash)
            if slot is not None:
                self.slots.move_to_end(block_hash)
            return slot

    def load(self, slot: int, block: int) -> None:
        self.pending.loads.append((slot, block))

    def take_copies(self) -> BlockCopies | None:
        """The copies the step being scheduled makes (None: none)."""
        copies, self.pending = self.pending, BlockCopies()
        return copies or None

    def mark_saved(self, copies: BlockCopies) -> None:
        """The step that made `copies` has finished: its saved slots may be read from the host."""
        with self.lock:
            live = set(self.slots.values())
            self.saved.update(slot for _, slot in copies.saves if slot in live)

    def readable(self, block_hash: BlockHash) -> int | None:
        """The slot of a saved block (caller holds `lock`), for a transfer server; None if absent or not yet saved."""
        slot = self.slots.get(block_hash)
        return slot if slot is not None and slot in self.saved else None

    def insert(self, block_hash: BlockHash) -> int | None:
        """A slot for a block received from elsewhere (caller holds `lock` and fills the slot at once); None if
        the tier has it already."""
        if block_hash in self.slots:
            self.slots.move_to_end(block_hash)
            return None
        if self.free_slots:
            slot = self.free_slots.pop()
        else:
            _, slot = self.slots.popitem(last=False)
        self.slots[block_hash] = slot
        self.saved.add(slot)
        return slot
