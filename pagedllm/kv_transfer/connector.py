"""The engine's KV connector (kv_transfer_config): a producer's block server and a consumer's puller, behind the hooks
the engine calls: `on_request` when a request is added (a consumer request that names a producer waits for its pull),
`collect` before each step (a producer pins and unpins what consumers asked for; pulls that ended release their
requests to the scheduler), `discard` when a waiting request is aborted. `make_connector` builds the configured one:
TcpConnector (blocks through the host tier over TCP, tcp.py) or IpcConnector (device to device through shared memory
on one host, ipc.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pagedllm.core.kv_cache import KVCacheManager
from pagedllm.engine.request import Request
from pagedllm.kv_transfer.config import KVTransferConfig, transfer_params
from pagedllm.kv_transfer.host_store import HostKVStore
from pagedllm.kv_transfer.ipc import IpcServer, Wakeup
from pagedllm.kv_transfer.ipc_pull import IpcPuller
from pagedllm.kv_transfer.layer_events import LayerEvents
from pagedllm.kv_transfer.tcp import KVPuller, KVServer

if TYPE_CHECKING:
    from pagedllm.worker.model_runner import ModelRunner


class KVConnector:
    """What the engine calls; subclasses set `server` (producer) and `puller` (consumer)."""

    kv_cache: KVCacheManager
    server: Any = None
    puller: Any = None
    wakeup: Wakeup | None = None  # readable when the producer has work while the engine idles (engine/core.py)

    def on_request(self, request: Request, extra_args: dict[str, Any] | None) -> None:
        """A consumer request with {"do_remote_prefill": true, "remote_host", "remote_port"} pulls its prompt's
        blocks before it may be scheduled (it keeps its place in the queue meanwhile). A producer request with
        {"do_remote_decode": true, "transfer_id": ...} is known by that id to consumers that ask for it early."""
        params = transfer_params(extra_args)
        if not params:
            return
        if self.puller is not None and params.get("do_remote_prefill"):
            self.puller.pull(request, self.kv_cache.prompt_block_hashes(request), params)
        elif self.server is not None and params.get("do_remote_decode") and params.get("transfer_id"):
            self.expect(str(params["transfer_id"]), request)

    def expect(self, transfer_id: str, request: Request) -> None:
        """Streamed transfers (the IpcConnector's) begin before the prompt is computed; others ignore the id."""

    def collect(self) -> None:
        if self.puller is not None and self.puller.pending:
            self.puller.collect()

    @property
    def pulling(self) -> bool:
        return self.puller is not None and bool(self.puller.pending)

    @property
    def external_queries(self) -> int:
        """Tokens asked of producers and received from them, beyond what the host tier counts."""
        return 0

    @property
    def external_hits(self) -> int:
        return 0

    def discard(self, request_id: str) -> None:
        if self.puller is not None:
            self.puller.discard(request_id)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.puller is not None:
            self.puller.close()


class TcpConnector(KVConnector):
    def __init__(self, config: KVTransferConfig, kv_cache: KVCacheManager, store: HostKVStore | None) -> None:
        tier = kv_cache.host_tier
        if tier is None or store is None:
            raise ValueError("the TcpConnector needs the prefix cache and a host KV tier (kv_offload_bytes > 0).")
        self.kv_cache = kv_cache
        if config.produces:
            self.server = KVServer(tier, store, kv_cache.block_size, config.kv_ip, config.kv_port)
        self.puller = KVPuller(tier, store, kv_cache.block_size) if config.consumes else None

    def collect(self) -> None:
        if not self.kv_cache.host_tier.pending:  # type: ignore[union-attr]
            super().collect()


class IpcConnector(KVConnector):
    def __init__(self, config: KVTransferConfig, kv_cache: KVCacheManager, runner: ModelRunner) -> None:
        kv_caches = [layer.kv_cache for layer in runner.attn_layers]
        if not kv_caches:
            raise ValueError("the IpcConnector transfers KV blocks; this model keeps none.")
        self.kv_cache = kv_cache
        if config.produces:
            extra = config.kv_connector_extra_config
            if kv_caches[0].is_cuda:
                runner.layer_events = LayerEvents(kv_caches)
            self.server = IpcServer(kv_cache, kv_caches, runner.kv_shared_pool, runner.layer_events, config.kv_ip,
                                    config.kv_port, float(extra.get("lease_timeout_s", 60.0)),
                                    float(extra.get("arrival_timeout_s", 10.0)))
            self.wakeup = self.server.wakeup
        if config.consumes:
            self.puller = IpcPuller(kv_cache, kv_caches)

    def collect(self) -> None:
        if self.server is not None:
            self.server.serve()
        if self.puller is not None and (self.puller.pending or self.puller.holding):
            self.puller.collect()

    def expect(self, transfer_id: str, request: Request) -> None:
        self.server.expect(transfer_id, request)

    @property
    def external_queries(self) -> int:
        return 0 if self.puller is None else self.puller.external_queries

    @property
    def external_hits(self) -> int:
        return 0 if self.puller is None else self.puller.external_hits


def make_connector(config: KVTransferConfig | None, kv_cache: KVCacheManager,
                   runner: ModelRunner) -> KVConnector | None:
    """The engine's connector, or None (no transfer; the OffloadingConnector is the host tier alone)."""
    if config is None:
        return None
    if config.kv_connector == "TcpConnector":
        return TcpConnector(config, kv_cache, runner.host_store)
    if config.kv_connector == "IpcConnector":
        return IpcConnector(config, kv_cache, runner)
    return None
