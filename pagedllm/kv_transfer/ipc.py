"""KV transfer between engines on one host through shared device memory (the IpcConnector): CUDA IPC between GPU
processes, a shared-memory pool on the CPU, the same code path for both (ipc_pool.py maps and copies).

Control goes over TCP (wire.py's framing), data never does. A consumer connection:
  hello                  -> the producer's layout, its pool's id and export (CUDA IPC handles or the memfd's path),
                            and (CUDA) interprocess events: one after all launched steps, one per layer (layer_events.py);
                            the consumer maps a pool once per pool id.
  get {hashes}           -> {lease, blocks}: the leading run of the hashes the producer's GPU prefix cache holds, pinned
                            (a reference each: not evicted, not reused) until
  release {lease}        -> unpinned; also when the connection drops or stays silent for the lease timeout.
  get {hashes, transfer_id}
                         -> {lease, blocks, more: true}, ..., {lease, blocks, more: false}: a streamed get, sent while
                            the producer's request with that transfer id (from the proxy) is queued or computing. Each
                            part is the run's next blocks, sent after the step that schedules them was launched; the
                            last comes when the run is complete, or the request's prompt is all scheduled or finished,
                            or the request has not come within arrival_timeout_s. On CUDA the consumer copies each part
                            layer by layer, each layer after the producer's event for it: the transfer overlaps the
                            producer's compute of the prompt's later layers and chunks.
  stats                  -> {leases, pinned_blocks} (tests, operators: `producer_stats`).
Pinning runs on the producer's engine thread (the pool is not thread-safe): the server thread queues each get and
release and pokes `wakeup`, which an idle engine core sleeps on beside its pipe (engine/core.py), and `serve` answers
them between steps. (An offline `LLM` producer answers only while it steps; a loop of one's own around an LLMEngine
steps it when `wakeup` is readable, as the core does.) Before answering a get on CUDA it records the interprocess
event on its compute stream: the consumer's copy waits for it (or a streamed part's, for each layer's event), so
blocks a step still in flight registers are copied only once written.

The consumer's side is ipc_pull.py: it copies producer blocks into blocks of its own pool (block tables on the two
sides differ) and registers them in its prefix cache under the prompt's hashes, so the request's prefix lookup hits
them."""

from __future__ import annotations

import queue
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from pagedllm.core.kv_cache import KVCacheManager
from pagedllm.engine.request import Request
from pagedllm.kv_transfer.ipc_pool import SharedMemoryPool, b64, export_pool, pool_layout
from pagedllm.kv_transfer.layer_events import LayerEvents
from pagedllm.kv_transfer.wire import CLOSED, TIMEOUT_S, KVTransferError, MessageServer, recv_message, send_message
from pagedllm.logger import get_logger

logger = get_logger(__name__)
BlockHash = bytes
_POLL_S = 0.5  # a streamed answer's connection checks this often whether the consumer gave up
# Pools this process exports, by pool id, with their events: a consumer in the same process uses them as they are.
LOCAL_POOLS: dict[str, tuple[list[torch.Tensor], torch.cuda.Event | None, LayerEvents | None]] = {}


class Wakeup:
    """A byte on a socket pair: another thread's `set` wakes a loop that waits on `fileno()` (select, mp wait)."""

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)

    def fileno(self) -> int:
        return self._read.fileno()

    def set(self) -> None:
        try:
            self._write.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def clear(self) -> None:
        try:
            while self._read.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._read.close()
        self._write.close()


@dataclass(eq=False)
class _Ask:
    lease: str
    hashes: list[BlockHash]
    blocks: list[int] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    # A streamed ask (it names the transfer id its producer request carries): answered in parts, each part the blocks
    # that appeared since the last one, as the producer's steps reach them; (blocks, more) pairs for its connection.
    transfer_id: str | None = None
    parts: queue.SimpleQueue[tuple[list[int], bool]] = field(default_factory=queue.SimpleQueue)
    since: float = field(default_factory=time.monotonic)


class IpcServer:
    """The producer's side: exports its pool and pins the blocks consumers copy (see the module's docstring)."""

    def __init__(self, kv_cache: KVCacheManager, kv_caches: list[torch.Tensor], shared: SharedMemoryPool | None,
                 layer_events: LayerEvents | None, host: str, port: int, lease_timeout_s: float,
                 arrival_timeout_s: float) -> None:
        self.pool, self.lease_timeout_s, self.arrival_timeout_s = kv_cache.pool, lease_timeout_s, arrival_timeout_s
        self.hello: dict[str, Any] = {**pool_layout(kv_caches, kv_cache.block_size), "pool_id": uuid.uuid4().hex,
                                      "num_blocks": kv_cache.num_blocks, "pool": export_pool(kv_caches, shared)}
        self.device = kv_caches[0].device
        self.ready: torch.cuda.Event | None = None
        if self.device.type == "cuda":
            assert layer_events is not None
            with torch.cuda.device(self.device):
                self.ready = torch.cuda.Event(interprocess=True)
                self.ready.record(torch.cuda.current_stream(self.device))
            self.hello["ready_event"] = b64(self.ready.ipc_handle())
            self.hello["layer_events"] = [b64(handle) for handle in layer_events.handles()]
        LOCAL_POOLS[self.hello["pool_id"]] = (kv_caches, self.ready, layer_events)
        self.requests: queue.SimpleQueue[_Ask | str] = queue.SimpleQueue()  # gets, and leases to release
        self.leases: dict[str, list[int]] = {}  # engine thread only
        self.streams: dict[str, _Ask] = {}  # streamed asks still answering, by lease (engine thread only)
        self.transfers: dict[str, Request] = {}  # this engine's requests by transfer id (engine thread only)
        self.num_pinned = 0  # blocks pinned for consumers (read by any thread)
        self.wakeup = Wakeup()
        self.server = MessageServer(host, port, self._handle, "kv-ipc-server")
        logger.info("KV transfer server (producer, %s IPC) on %s:%d", self.hello["pool"]["kind"], host, self.port)

    @property
    def port(self) -> int:
        return self.server.port

    def _submit(self, item: _Ask | str) -> None:
        self.requests.put(item)
        self.wakeup.set()

    def _handle(self, sock: socket.socket) -> None:
        """One consumer connection (its own thread); whatever it still holds is released when it ends."""
        sock.settimeout(self.lease_timeout_s)  # a consumer silent this long loses its leases
        held: set[str] = set()
        try:
            while True:
                message = recv_message(sock)
                op = message.get("op")
                if op == "hello":
                    send_message(sock, self.hello)
                elif op == "get":
                    transfer_id = message.get("transfer_id")
                    ask = _Ask(uuid.uuid4().hex, [bytes.fromhex(h) for h in message["hashes"]],
                               transfer_id=None if transfer_id is None else str(transfer_id))
                    held.add(ask.lease)
                    self._submit(ask)
                    if ask.transfer_id is not None:
                        self._stream(sock, ask, held)
                        continue
                    answered = ask.done.wait(TIMEOUT_S)  # an engine stuck in a long step: nothing, this time
                    send_message(sock, {"lease": ask.lease, "blocks": ask.blocks if answered else []})
                elif op == "release" and message.get("lease") in held:
                    held.discard(message["lease"])
                    self._submit(message["lease"])
                elif op == "stats":
                    send_message(sock, {"leases": len(self.leases), "pinned_blocks": self.num_pinned})
                else:
                    raise KVTransferError(f"unknown op {op!r}")
        except CLOSED:
            pass
        finally:
            for lease in held:
                self._submit(lease)

    def _stream(self, sock: socket.socket, ask: _Ask, held: set[str]) -> None:
        """Sends a streamed ask's parts as the engine finds them; a consumer that gives up closes the connection or
        releases the lease. While no part comes the engine is woken now and then: an idle one must still notice
        that the request it waits for never came."""
        while True:
            try:
                blocks, more = ask.parts.get(timeout=_POLL_S)
            except queue.Empty:
                if select.select([sock], [], [], 0)[0]:
                    message = recv_message(sock)
                    if message.get("op") != "release" or message.get("lease") != ask.lease:
                        raise KVTransferError(f"unexpected {message.get('op')!r} during a streamed answer")
                    held.discard(ask.lease)
                    self._submit(ask.lease)
                    return
                self.wakeup.set()
                continue
            send_message(sock, {"lease": ask.lease, "blocks": blocks, "more": more})
            if not more:
                return

    def expect(self, transfer_id: str, request: Request) -> None:
        """This engine's request (kv_transfer_params {"do_remote_decode": true, "transfer_id": ...}) whose blocks a
        consumer may ask for before they exist (the proxy sends both sides at once)."""
        self.transfers[transfer_id] = request

    def serve(self) -> None:
        """Pins for the queued gets, unpins for the releases, in order, then answers what the streamed asks can
        have now: on the engine's thread, between steps (after the last step's launch: its blocks are registered
        and its per-layer events recorded)."""
        self.wakeup.clear()
        recorded = False
        while True:
            try:
                item = self.requests.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, str):
                blocks = self.leases.pop(item, [])
                self.streams.pop(item, None)
                self.pool.release(blocks)
                self.num_pinned -= len(blocks)
                continue
            self.leases[item.lease] = item.blocks
            if item.transfer_id is not None:
                self.streams[item.lease] = item
                continue
            self._pin_more(item)
            if self.ready is not None and not recorded:  # after every step launched so far, before any answer
                self.ready.record(torch.cuda.current_stream(self.device))
                recorded = True
            item.done.set()
        for ask in list(self.streams.values()):
            self._advance(ask)
        self._forget_transfers()

    def _advance(self, ask: _Ask) -> None:
        """Pins the next run of a streamed ask's blocks the cache holds now and sends it; the last part says so: all
        there, or the request's prompt all scheduled (what is missing will not come), or it finished, or it never
        came (arrival_timeout_s)."""
        found = self._pin_more(ask)
        request = self.transfers.get(ask.transfer_id or "")
        if request is None:
            over = time.monotonic() - ask.since > self.arrival_timeout_s
        else:
            over = request.status.finished or request.num_computed_tokens >= len(request.prompt_token_ids)
        more = len(ask.blocks) < len(ask.hashes) and not over
        if found or not more:
            ask.parts.put((found, more))
        if not more:
            del self.streams[ask.lease]

    def _pin_more(self, ask: _Ask) -> list[int]:
        """Pins the blocks the cache holds now for the ask's hashes after those it has, up to the first missing one;
        they join `ask.blocks` (its lease's list) and are returned."""
        found: list[int] = []
        for block_hash in ask.hashes[len(ask.blocks) :]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            found.append(block)
        self.pool.touch(found)
        ask.blocks += found
        self.num_pinned += len(found)
        return found

    def _forget_transfers(self) -> None:
        """Finished requests are kept by transfer id for a lease timeout: a consumer's ask may come after them."""
        now = time.time()
        for transfer_id, request in list(self.transfers.items()):
            finished = request.metrics.finished_time
            if request.status.finished and (finished is None or now - finished > self.lease_timeout_s):
                del self.transfers[transfer_id]

    def close(self) -> None:
        self.server.close()
        self.wakeup.close()
        LOCAL_POOLS.pop(self.hello["pool_id"], None)


def producer_stats(host: str, port: int) -> dict[str, int]:
    """A producer's leases and pinned blocks (for tests and operators)."""
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
        send_message(sock, {"op": "stats"})
        return {k: int(v) for k, v in recv_message(sock).items()}
