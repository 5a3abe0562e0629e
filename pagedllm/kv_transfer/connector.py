"""The engine's KV connector (kv_transfer_config's TcpConnector): the producer's block server and the consumer's
puller around the host tier, and the two hooks the engine calls: `on_request` when a request is added (a consumer
request that names a producer waits for its pull) and `collect` before each step (pulls that ended release their
requests to the scheduler)."""

from __future__ import annotations

from typing import Any

from pagedllm.core.kv_cache import KVCacheManager
from pagedllm.engine.request import Request
from pagedllm.kv_transfer.config import KVTransferConfig, transfer_params
from pagedllm.kv_transfer.host_store import HostKVStore
from pagedllm.kv_transfer.tcp import KVPuller, KVServer


class TcpConnector:
    def __init__(self, config: KVTransferConfig, kv_cache: KVCacheManager, store: HostKVStore | None) -> None:
        tier = kv_cache.host_tier
        if tier is None or store is None:
            raise ValueError("the TcpConnector needs the prefix cache and a host KV tier (kv_offload_bytes > 0).")
        self.kv_cache = kv_cache
        self.server = KVServer(tier, store, kv_cache.block_size, config.kv_ip, config.kv_port) if config.produces else None
        self.puller = KVPuller(tier, store, kv_cache.block_size) if config.consumes else None

    def on_request(self, request: Request, extra_args: dict[str, Any] | None) -> None:
        """A consumer request with {"do_remote_prefill": true, "remote_host", "remote_port"} pulls its prompt's
        blocks before it may be scheduled (it keeps its place in the queue meanwhile)."""
        params = transfer_params(extra_args)
        if self.puller is not None and params and params.get("do_remote_prefill"):
            self.puller.pull(request, self.kv_cache.prompt_block_hashes(request), params)

    def collect(self) -> None:
        if self.puller is not None and self.puller.pending and not self.kv_cache.host_tier.pending:  # type: ignore[union-attr]
            self.puller.collect()

    @property
    def pulling(self) -> bool:
        return self.puller is not None and bool(self.puller.pending)

    def discard(self, request_id: str) -> None:
        if self.puller is not None:
            self.puller.discard(request_id)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.puller is not None:
            self.puller.close()
