"""The IpcConnector's consumer (the producer and the protocol: ipc.py): a request whose prompt a producer on this host
prefilled waits in the queue while a worker thread asks the producer for its blocks; between steps the engine takes
free blocks of its own pool, copies producer blocks -> its blocks for every layer straight from the mapped pool (on
CUDA on a side stream ordered after its own steps in flight; a later step polls the copy's event, so no step waits
for a transfer), registers them in its prefix cache under the prompt's hashes, hands the lease back and lets the
request be scheduled: its prefix lookup hits them, so only the last partial block and token are computed.

The copied blocks stay held (a reference each) until their request is admitted, or they could be evicted by the
steps before it (a burst of transfers would evict its own blocks first). Holds are capped at half the pool (a copy
past the cap waits for admissions to free some, `_DEFER_S` at most) and dropped if the engine stalls with nothing
running, so they never keep a request that needs the other half from running. Layouts that differ (device, dtype,
block size, layers, per-layer block shape) refuse the pairing with both named, and the request prefills locally, as
it does when the producer is gone."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from pagedllm.core.kv_cache import KVCacheManager
from pagedllm.engine.request import RequestStatus
from pagedllm.kv_transfer.ipc import LOCAL_POOLS
from pagedllm.kv_transfer.ipc_pool import copy_blocks, map_pool, pool_layout, unb64
from pagedllm.kv_transfer.wire import CLOSED, TIMEOUT_S, KVTransferError, recv_message, send_message
from pagedllm.logger import get_logger

logger = get_logger(__name__)
BlockHash = bytes
_DEFER_S = 10.0  # a copy waits this long at most for room under the cap (well within the producer's lease timeout)


@dataclass(eq=False)
class _Source:
    """A producer's pool, mapped, with its events (CUDA): after all its launched steps, and per layer."""

    pool_id: str
    tensors: list[torch.Tensor]
    ready: torch.cuda.Event | None
    layer_events: list[torch.cuda.Event] | None


@dataclass(eq=False)
class _Answer:
    """The producer's blocks for the asked hashes, in order; a streamed answer grows (a worker thread appends each
    part under the puller's lock) until `more` is False."""

    sock: socket.socket
    source: _Source
    lease: str
    blocks: list[int]
    more: bool = False
    streamed: bool = False
    closed: bool = False  # released by this side: a part still on its way is dropped

    def release(self) -> None:
        try:
            send_message(self.sock, {"op": "release", "lease": self.lease})
        except OSError:
            pass  # gone: the producer releases on the disconnect
        self.sock.close()


@dataclass(eq=False)
class _Pull:
    request: Any
    prompt_hashes: list[BlockHash]
    first: int  # prompt_hashes[first:] are asked for: those before were cached here when the request came
    future: Future[_Answer]
    started: float
    answered: float | None = None
    copies: list[tuple[int, int, BlockHash]] = field(default_factory=list)  # (producer block, our block, hash)
    held: list[int] = field(default_factory=list)  # our blocks of the prompt's run, a reference each
    begun: torch.cuda.Event | None = None
    done: torch.cuda.Event | None = None  # after the latest copy (one stream: after all of them)
    launched: bool = False
    taken: int = 0  # how many of the answer's blocks are copied (or were here already, or found no room)
    full: bool = False  # a block found no room here: the rest of the run is computed here


class IpcPuller:
    """Asks on worker threads; copies, registers and holds between steps (on the engine's thread)."""

    def __init__(self, kv_cache: KVCacheManager, kv_caches: list[torch.Tensor]) -> None:
        self.kv_cache, self.kv_caches = kv_cache, kv_caches
        self.device, self.block_size = kv_caches[0].device, kv_cache.block_size
        self.expected = pool_layout(kv_caches, kv_cache.block_size)
        self.block_bytes = sum(kv[:, 0].numel() * kv.element_size() for kv in kv_caches)
        self.max_held = max(1, kv_cache.num_blocks // 2)
        self.sources: dict[tuple[str, int], _Source] = {}  # by producer address; replaced when its pool id changes
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kv-ipc-pull")
        self.pending: dict[str, _Pull] = {}  # requests waiting for their blocks
        self.holding: dict[str, _Pull] = {}  # requests released to the scheduler, their blocks held until admitted
        self.num_held = 0
        self._stalled = False
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        # Counters, for metrics and benchmarks: tokens asked of producers and copied, bytes, copy and pull seconds.
        self.external_queries = self.external_hits = self.received_blocks = self.transfer_bytes = 0
        self.copy_seconds = self.pull_seconds = 0.0
        self.parts_received = 0  # answers and their parts (a streamed answer comes in several)
        self.last_error: str | None = None  # why the latest failed pull failed (its request prefilled locally)

    def pull(self, request: Any, hashes: list[BlockHash], params: dict[str, Any]) -> None:
        host, port = params.get("remote_host"), params.get("remote_port")
        first = 0
        while first < len(hashes) and self.kv_cache.pool.lookup(hashes[first]) is not None:
            first += 1  # held here already
        if first == len(hashes) or not host or not port:
            return
        request.kv_transfer_pending = True
        transfer_id = params.get("transfer_id")
        future = self.executor.submit(self._ask, str(host), int(port), hashes[first:],
                                      None if transfer_id is None else str(transfer_id))
        self.pending[request.request_id] = _Pull(request, hashes, first, future, time.perf_counter())

    def _ask(self, host: str, port: int, hashes: list[BlockHash], transfer_id: str | None) -> _Answer:
        """hello and get (a worker thread): the producer's blocks for `hashes`, pinned under a lease. With a transfer
        id the answer comes in parts while the producer computes the prompt: the first part returns here, the rest
        are received on another worker thread."""
        sock = socket.create_connection((host, port), timeout=TIMEOUT_S)
        try:
            send_message(sock, {"op": "hello"})
            source, num_blocks = self._source(host, port, recv_message(sock))
            ask: dict[str, Any] = {"op": "get", "hashes": [h.hex() for h in hashes]}
            if transfer_id is not None:
                ask["transfer_id"] = transfer_id
                sock.settimeout(None)  # parts come as the producer's steps reach them; it ends the stream
            send_message(sock, ask)
            message = recv_message(sock)
            answer = _Answer(sock, source, str(message["lease"]), [], streamed=transfer_id is not None)
            self._add_part(answer, message, len(hashes), num_blocks)
            if answer.more:
                self.executor.submit(self._receive, answer, len(hashes), num_blocks)
            return answer
        except BaseException:
            sock.close()
            raise

    def _add_part(self, answer: _Answer, message: dict[str, Any], num_hashes: int, num_blocks: int) -> None:
        blocks = [int(b) for b in message["blocks"]]
        if any(not 0 <= b < num_blocks for b in blocks) or len(answer.blocks) + len(blocks) > num_hashes:
            raise KVTransferError("KV transfer: block ids out of the producer's pool's range, or too many")
        with self.lock:
            if not answer.closed:
                answer.blocks += blocks
                answer.more = bool(message.get("more", False))
                self.parts_received += 1

    def _receive(self, answer: _Answer, num_hashes: int, num_blocks: int) -> None:
        """A streamed answer's later parts (a worker thread); a broken stream ends it with the blocks it has."""
        try:
            while answer.more:
                self._add_part(answer, recv_message(answer.sock), num_hashes, num_blocks)
        except CLOSED as error:
            with self.lock:
                if not answer.closed:
                    logger.warning("KV transfer from the producer broke off (%s): the rest is computed here", error)
                answer.more = False

    def _source(self, host: str, port: int, hello: dict[str, Any]) -> tuple[_Source, int]:
        theirs = {key: hello.get(key) for key in self.expected}
        if theirs != self.expected:
            raise KVTransferError(f"KV transfer from {host}:{port} refused: the producer's pool holds blocks of "
                                  f"{theirs}, this engine's {self.expected} (device, dtype, block size, layers and "
                                  "per-layer block shape must match).")
        with self.lock:
            source = self.sources.get((host, port))
            if source is None or source.pool_id != hello["pool_id"]:
                local = LOCAL_POOLS.get(str(hello["pool_id"]))  # CUDA cannot open its own IPC handles
                if local is not None:
                    tensors, ready, signals = local
                    layer_events = None if signals is None else signals.events
                else:
                    tensors, ready, layer_events = map_pool(hello["pool"], self.kv_caches[0].dtype), None, None
                    if "ready_event" in hello:
                        device = tensors[0].device
                        ready = torch.cuda.Event.from_ipc_handle(device, unb64(hello["ready_event"]))
                        layer_events = [torch.cuda.Event.from_ipc_handle(device, unb64(handle))
                                        for handle in hello.get("layer_events", [])] or None
                source = _Source(str(hello["pool_id"]), tensors, ready, layer_events)
                self.sources[(host, port)] = source
                logger.info("mapped the KV pool of %s:%d (%s)", host, port, hello["pool"]["kind"])
        return source, int(hello["num_blocks"])

    # ---- the engine's thread -------------------------------------------------------------
    def collect(self) -> None:
        """Drops the holds of admitted requests; starts the copies whose answer came (room permitting); releases to
        the scheduler the requests whose copy has ended, or whose pull failed (they prefill locally)."""
        self._drop_holds()
        for request_id, pull in list(self.pending.items()):
            if not pull.future.done():
                continue
            try:
                answer = pull.future.result()
            except Exception as error:  # noqa: BLE001 - unreachable, refused, unmappable: a local prefill
                self._fail(request_id, error)
                continue
            pull.answered = pull.answered or time.perf_counter()
            with self.lock:
                more, num_blocks = answer.more, len(answer.blocks)
            try:
                if not pull.launched and not self._hold(pull):
                    if time.perf_counter() - pull.answered > _DEFER_S:
                        self._close(answer)
                        self._fail(request_id, KVTransferError(f"no room for {len(pull.prompt_hashes)} blocks"))
                    continue
                if num_blocks > pull.taken:
                    self._copy(pull, answer, num_blocks)
            except Exception as error:  # noqa: BLE001 - a copy that cannot start: our blocks back, a local prefill
                self._unhold(pull)
                self._close(answer)
                self._fail(request_id, error)
                continue
            if not more and (pull.done is None or pull.done.query()):
                self._finish(request_id, pull)

    def _drop_holds(self) -> None:
        """Holds end once their request has been admitted (it references the blocks itself), or for all when the
        engine has stalled: holds, nothing running, twice in a row (the queue's head may need the held blocks)."""
        for request_id, pull in list(self.holding.items()):
            if pull.request.status is not RequestStatus.WAITING:
                self._unhold(self.holding.pop(request_id))
        stalled = bool(self.holding) and not self.kv_cache.block_tables
        if stalled and self._stalled:
            for pull in self.holding.values():
                self._unhold(pull)
            self.holding.clear()
        self._stalled = stalled

    def _unhold(self, pull: _Pull) -> None:
        self.kv_cache.pool.release(reversed(pull.held))  # the prompt's tail is evicted first
        self.num_held -= len(pull.held)
        pull.held = []

    def _hold(self, pull: _Pull) -> bool:
        """Before the first copy: holds the prompt's blocks that were here when the request came; False (nothing
        done) while the cap cannot take the whole prompt's run."""
        if self.num_held and self.num_held + len(pull.prompt_hashes) > self.max_held:
            return False
        pull.launched = True
        pool = self.kv_cache.pool
        kept = [block for h in pull.prompt_hashes[: pull.first] if (block := pool.lookup(h)) is not None]
        pool.touch(kept)  # held too: the blocks taken below must not evict them
        pull.held = kept
        self.num_held += len(kept)
        return True

    def _copy(self, pull: _Pull, answer: _Answer, end: int) -> None:
        """Copies answer.blocks[pull.taken:end] into blocks of ours (those here already are held instead); on CUDA
        on a side stream after the producer's steps that write them: a streamed answer waits layer by layer."""
        pool, start = self.kv_cache.pool, pull.taken
        pull.taken = end
        if pull.full:
            return
        todo: list[tuple[int, int]] = []  # (producer block, index into the prompt's hashes)
        for k, src in enumerate(answer.blocks[start:end]):
            index = pull.first + start + k
            local = pool.lookup(pull.prompt_hashes[index])
            if local is not None:
                pool.touch([local])
                pull.held.append(local)
                self.num_held += 1
            else:
                todo.append((src, index))
        dst = pool.take(min(len(todo), pool.num_free))
        pull.full = len(dst) < len(todo)
        copies = [(src, block, pull.prompt_hashes[i]) for (src, i), block in zip(todo, dst)]
        pull.copies += copies
        pull.held += dst
        self.num_held += len(dst)
        if not copies:
            return
        src_ids, dst_ids = [c[0] for c in copies], [c[1] for c in copies]
        if self.device.type != "cuda":
            began = time.perf_counter()
            copy_blocks(answer.source.tensors, self.kv_caches, src_ids, dst_ids)
            self.copy_seconds += time.perf_counter() - began
            return
        src_device = answer.source.tensors[0].device
        stream, src_stream = self._stream(self.device), self._stream(src_device)
        stream.wait_stream(torch.cuda.current_stream(self.device))  # steps in flight may still write freed blocks
        layer_events = answer.source.layer_events if answer.streamed else None

        def wait(event: torch.cuda.Event) -> None:
            src_stream.wait_event(event)
            if src_stream is not stream:
                stream.wait_stream(src_stream)

        if layer_events is None:
            assert answer.source.ready is not None
            wait(answer.source.ready)  # the producer's steps that wrote its blocks
        if pull.begun is None:
            pull.begun = torch.cuda.Event(enable_timing=True)
            pull.begun.record(stream)
        pull.done = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(src_stream), torch.cuda.stream(stream):  # one stream twice on one GPU
            copy_blocks(answer.source.tensors, self.kv_caches, src_ids, dst_ids,
                        before_layer=None if layer_events is None else lambda layer: wait(layer_events[layer]))
            pull.done.record(stream)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def _finish(self, request_id: str, pull: _Pull) -> None:
        """The copy has ended: our blocks join the prefix cache, the lease goes back, the request may be scheduled."""
        for _, block, block_hash in pull.copies:
            self.kv_cache.pool.cache(block, block_hash)
        self._close(pull.future.result())
        n = len(pull.copies)
        if pull.done is not None and pull.begun is not None:
            self.copy_seconds += pull.begun.elapsed_time(pull.done) / 1e3
        elapsed = time.perf_counter() - pull.started
        self.received_blocks += n
        self.transfer_bytes += n * self.block_bytes
        self.external_queries += (len(pull.prompt_hashes) - pull.first) * self.block_size  # with the hits: metrics
        self.external_hits += n * self.block_size  # count them together
        self.pull_seconds += elapsed
        logger.debug("request %s: %d blocks (%d bytes) copied from the producer's pool, %.2f ms after it came",
                     request_id, n, n * self.block_bytes, elapsed * 1e3)
        self.holding[request_id] = self.pending.pop(request_id)
        pull.request.kv_transfer_pending = False

    def _fail(self, request_id: str, error: BaseException) -> None:
        logger.warning("request %s prefills locally: %s", request_id, error)
        self.last_error = str(error)
        pull = self.pending.pop(request_id)
        self.external_queries += (len(pull.prompt_hashes) - pull.first) * self.block_size
        pull.request.kv_transfer_pending = False

    def discard(self, request_id: str) -> None:
        """A finished or aborted request: its held blocks go back, and the producer's lease once its answer comes."""
        pull = self.holding.pop(request_id, None)
        if pull is not None:
            self._unhold(pull)
            return
        pull = self.pending.pop(request_id, None)
        if pull is None:
            return
        if not pull.launched:
            pull.future.cancel()
            pull.future.add_done_callback(self._release_answer)  # runs now if the answer is here, else on its thread
            return
        if pull.done is not None:
            pull.done.synchronize()  # the copy still reads the producer's blocks: they stay pinned until it ends
        self._unhold(pull)  # the copied blocks are not registered yet: reused first
        self._close(pull.future.result())

    def _close(self, answer: _Answer) -> None:
        """The lease goes back (a stream still coming ends with it) and the connection closes."""
        with self.lock:
            answer.more, answer.closed = False, True  # its receiver stops at the next part, or the closed connection
        answer.release()

    def _release_answer(self, future: Future[_Answer]) -> None:
        if not future.cancelled() and future.exception() is None:
            self._close(future.result())

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        for request_id in list(self.pending) + list(self.holding):
            self.discard(request_id)
