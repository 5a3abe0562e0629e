"""`kv_transfer_config` as vLLM spells it: {"kv_connector": ..., "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
"kv_ip": ..., "kv_port": ...}. Connectors here: "TcpConnector" (disaggregated prefill between engines, over TCP:
works on any host and on the CPU), "IpcConnector" (between engines on one host: block copies straight from the
producer's pool through CUDA IPC, or shared memory on the CPU; TCP carries only the control messages;
`kv_connector_extra_config` {"lease_timeout_s": S, "arrival_timeout_s": S}) and "OffloadingConnector" (the host-memory tier alone;
`kv_connector_extra_config` {"kv_offload_bytes": N} or vLLM's {"num_cpu_blocks": N}).

A request asks for a transfer through `SamplingParams.extra_args["kv_transfer_params"]` (the server maps the body's
`kv_transfer_params` there, as vLLM does): {"do_remote_decode": true} on the producer (a prefill-only request whose
response carries the producer's address), {"do_remote_prefill": true, "remote_host": ..., "remote_port": ...} on the
consumer, which pulls the prompt's blocks before it schedules the request. With the IpcConnector both may carry the
same "transfer_id": the consumer's pull then begins while the producer still computes the prompt (ipc.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

CONNECTORS = ("TcpConnector", "IpcConnector", "OffloadingConnector")
TRANSFERS = ("TcpConnector", "IpcConnector")  # the connectors that move KV between engines
ROLES = ("kv_producer", "kv_consumer", "kv_both")
DEFAULT_OFFLOAD_BYTES = 4 << 30  # the host tier a TcpConnector keeps unless kv_offload_bytes says otherwise


@dataclass
class KVTransferConfig:
    kv_connector: str
    kv_role: str = "kv_both"
    kv_ip: str = "127.0.0.1"
    kv_port: int = 14579
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_user(cls, value: Any) -> KVTransferConfig | None:
        if value is None or isinstance(value, KVTransferConfig):
            return value
        raw = json.loads(value) if isinstance(value, str) else dict(value)
        names = {"kv_connector", "kv_role", "kv_ip", "kv_port", "kv_connector_extra_config"}
        unknown = sorted(set(raw) - names - {"kv_rank", "kv_parallel_size", "engine_id", "kv_buffer_device"})
        if unknown:
            raise ValueError(f"kv_transfer_config: unknown keys {unknown}; it takes {sorted(names)}.")
        config = cls(**{k: v for k, v in raw.items() if k in names})
        if config.kv_connector not in CONNECTORS:
            raise ValueError(f"kv_transfer_config: kv_connector must be one of {', '.join(CONNECTORS)}; got "
                             f"{config.kv_connector!r}.")
        if config.kv_role not in ROLES:
            raise ValueError(f"kv_transfer_config: kv_role must be one of {', '.join(ROLES)}; got {config.kv_role!r}.")
        return config

    @property
    def produces(self) -> bool:
        return self.kv_connector in TRANSFERS and self.kv_role in ("kv_producer", "kv_both")

    @property
    def consumes(self) -> bool:
        return self.kv_connector in TRANSFERS and self.kv_role in ("kv_consumer", "kv_both")

    @property
    def shares_pool(self) -> bool:
        """Other processes map this engine's KV pool (an IpcConnector producer; on the CPU it is shared memory)."""
        return self.kv_connector == "IpcConnector" and self.produces

    def offload_bytes(self, block_bytes: int) -> int:
        """The host tier's size this connector asks for (kv_connector_extra_config), given one block's bytes."""
        extra = self.kv_connector_extra_config
        if "num_cpu_blocks" in extra:
            return int(extra["num_cpu_blocks"]) * block_bytes
        return int(extra.get("kv_offload_bytes", DEFAULT_OFFLOAD_BYTES if self.kv_connector == "TcpConnector" else 0))

    def producer_params(self) -> dict[str, Any]:
        """What a producer's response hands the proxy for the consumer: where to pull the blocks from, and whether
        the consumer may ask before the prompt is computed (`streamed`: the IpcConnector's; the proxy then sends
        both sides at once, the same `transfer_id` to each)."""
        params = {"do_remote_prefill": True, "remote_host": self.kv_ip, "remote_port": self.kv_port}
        return {**params, "streamed": True} if self.kv_connector == "IpcConnector" else params


def transfer_params(extra_args: dict[str, Any] | None) -> dict[str, Any] | None:
    params = (extra_args or {}).get("kv_transfer_params")
    if params is not None and not isinstance(params, dict):
        raise ValueError("kv_transfer_params must be an object.")
    return params
