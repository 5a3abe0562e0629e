"""KV transfer between engines over TCP, keyed by the prefix cache's block hashes (disaggregated prefill).

The producer writes every prompt block it computes through to its host tier (host_tier.py) and serves them: a
`KVServer` thread answers "hello" (the block layout it holds) and "get" (a list of hashes: the leading run of saved
blocks it has, as raw bytes). The consumer computes the same hashes for the same prompt (same tokens, cache salt and
adapter), pulls them on a worker thread (`KVPuller`) while the request waits its turn, puts them into its own host tier
and schedules the request, whose prefix lookup then loads them into GPU blocks like any host-tier hit: only the
prompt's last partial block and its last token are computed again. Block tables on the two sides never meet; the
block size, dtype and per-layer shapes must match, or the pull is refused with an error naming both layouts (and the
consumer prefills locally, as it does when the producer is gone).

Messages as wire.py frames them (an 8-byte length, then JSON); a "get" answer is followed by its blocks' bytes."""

from __future__ import annotations

import socket
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from pagedllm.kv_transfer.host_store import HostKVStore
from pagedllm.kv_transfer.host_tier import HostTier
from pagedllm.kv_transfer.wire import (CLOSED, TIMEOUT_S, KVTransferError, MessageServer, recv_exact, recv_message,
                                       send_message)
from pagedllm.logger import get_logger

logger = get_logger(__name__)
__all__ = ["KVPuller", "KVServer", "KVTransferError", "layout", "pull_blocks"]


def layout(store: HostKVStore, block_size: int) -> dict[str, Any]:
    """What must match between producer and consumer for a block's bytes to mean the same thing."""
    return {"block_size": block_size, "dtype": str(store.slots.dtype).removeprefix("torch."),
            "slot_shape": list(store.slot_shape)}


def _bytes_of(slot: torch.Tensor) -> torch.Tensor:
    """A host slot's memory as flat bytes (a view: writes land in the slot)."""
    return slot.reshape(-1).view(torch.uint8)


class KVServer:
    """The producer's side: serves saved blocks of its host tier by hash, from a thread of its own."""

    def __init__(self, tier: HostTier, store: HostKVStore, block_size: int, host: str, port: int) -> None:
        info, slot_bytes = layout(store, block_size), store.slots[0].numel() * store.slots.element_size()

        def handle(sock: socket.socket) -> None:
            while True:
                try:
                    message = recv_message(sock)
                except CLOSED:
                    return
                if message.get("op") == "hello":
                    send_message(sock, info)
                    continue
                chunks = []
                with tier.lock:  # a slot is read only while no save can take it over
                    for block_hash in message.get("hashes", []):
                        slot = tier.readable(bytes.fromhex(block_hash))
                        if slot is None:
                            break
                        chunks.append(_bytes_of(store.slots[slot]).numpy().tobytes())
                send_message(sock, {"found": len(chunks), "slot_bytes": slot_bytes}, b"".join(chunks))

        self.server = MessageServer(host, port, handle, "kv-server")
        logger.info("KV transfer server (producer) on %s:%d", host, self.port)

    @property
    def port(self) -> int:
        return self.server.port

    def close(self) -> None:
        self.server.close()


def pull_blocks(host: str, port: int, hashes: list[bytes], expected: dict[str, Any]) -> list[bytes]:
    """The leading run of `hashes` the producer at host:port holds, each block's bytes; KVTransferError when the two
    engines' block layouts differ, OSError when the producer cannot be reached."""
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
        send_message(sock, {"op": "hello"})
        info = recv_message(sock)
        if info != expected:
            raise KVTransferError(f"KV transfer from {host}:{port} refused: the producer holds blocks of {info}, this "
                                  f"engine {expected} (block size, dtype and per-layer shapes must match).")
        send_message(sock, {"op": "get", "hashes": [h.hex() for h in hashes]})
        answer = recv_message(sock)
        size, found = int(answer["slot_bytes"]), int(answer["found"])
        data = recv_exact(sock, size * found)
    return [data[i * size : (i + 1) * size] for i in range(found)]


class KVPuller:
    """The consumer's side: pulls run on a small thread pool; the engine collects finished ones between steps."""

    def __init__(self, tier: HostTier, store: HostKVStore, block_size: int) -> None:
        self.tier, self.store, self.expected = tier, store, layout(store, block_size)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-pull")
        self.pending: dict[str, tuple[Any, list[bytes], Future[list[bytes]]]] = {}  # request id -> (request, ...)
        self.received_blocks = 0
        self.last_error: str | None = None  # why the latest failed pull failed (its request prefilled locally)

    def pull(self, request: Any, hashes: list[bytes], params: dict[str, Any]) -> None:
        host, port = params.get("remote_host"), params.get("remote_port")
        if not hashes or not host or not port:
            return  # nothing worth pulling (a prompt shorter than a block), or nowhere to pull it from
        request.kv_transfer_pending = True
        self.pending[request.request_id] = (request, hashes, self.pool.submit(pull_blocks, str(host), int(port), hashes,
                                                                                  self.expected))

    def collect(self) -> list[Any]:
        """Requests whose pull has ended, their blocks (if any) in the host tier; call between steps, with no host-tier
        copies pending (a CPU write must not race a copy of the same slot)."""
        done = [rid for rid, (_, _, future) in self.pending.items() if future.done()]
        if not done:
            return []
        if self.store.slots.is_pinned() and torch.cuda.is_available():
            torch.cuda.synchronize()  # launched steps' copies may still read slots the inserts below take over
        ready = []
        for rid in done:
            request, hashes, future = self.pending.pop(rid)
            try:
                blocks = future.result()
            except CLOSED as error:
                logger.warning("request %s prefills locally: %s", rid, error)
                self.last_error, blocks = str(error), []
            with self.tier.lock:
                for block_hash, data in zip(hashes, blocks):
                    slot = self.tier.insert(block_hash)
                    if slot is not None:
                        _bytes_of(self.store.slots[slot]).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            self.received_blocks += len(blocks)
            request.kv_transfer_pending = False
            ready.append(request)
        return ready

    def discard(self, request_id: str) -> None:
        self.pending.pop(request_id, None)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
