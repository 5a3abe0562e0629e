"""Worker ranks as Ray actors, for worlds that span the nodes of a Ray cluster. One placement group
holds a bundle per rank (a GPU, or a CPU on CPU engines); bundle 0 is the driver's own rank and is
pinned to the driver's node. The driver joins the cluster at RAY_ADDRESS, or the local one that
`ray start` runs, or starts a local one. Ranks meet over torch.distributed as with processes."""

from __future__ import annotations

import threading
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.executor.workers import Workers
from pagedllm.worker.worker import run_worker

_PLACEMENT_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 10.0


class _Rank:
    """A Ray actor running one rank's loop (its `run` call returns when the engine shuts down)."""

    def run(self, config: EngineConfig, rank: int, host: str, port: int) -> None:
        run_worker(config, rank, host, port)


class RayWorkers(Workers):
    backend = "ray"

    def __init__(self, config: EngineConfig, port: int) -> None:
        super().__init__()
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init()
        self.ray = ray
        host = ray.util.get_node_ip_address()
        gpu = config.device.startswith("cuda")
        bundles: list[dict[str, float]] = [{"GPU" if gpu else "CPU": 1.0} for _ in range(config.world_size)]
        bundles[0][f"node:{host}"] = 0.001
        self.group = placement_group(bundles, strategy="PACK")
        ready, _ = ray.wait([self.group.ready()], timeout=_PLACEMENT_TIMEOUT_S)
        if not ready:
            ray.util.remove_placement_group(self.group)
            raise RuntimeError(
                f"Ray could not place {config.world_size} ranks (one {'GPU' if gpu else 'CPU'} each, the first on this node) "
                f"within {_PLACEMENT_TIMEOUT_S:.0f} s; cluster resources: {ray.cluster_resources()}"
            )
        actor = ray.remote(num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0)(_Rank)
        self.actors = [
            actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank)).remote()
            for rank in range(1, config.world_size)
        ]
        self.runs: list[Any] = [a.run.remote(config, rank, host, port) for rank, a in enumerate(self.actors, start=1)]
        threading.Thread(target=self._watch, name="pagedllm-ray-watchdog", daemon=True).start()

    def _watch(self) -> None:
        ready, _ = self.ray.wait(self.runs, num_returns=1)
        rank = self.runs.index(ready[0]) + 1
        try:
            self.ray.get(ready[0])
            reason = "its loop returned"
        except Exception as error:  # noqa: BLE001 - the actor's death or the rank's exception
            reason = f"{type(error).__name__}: {error}"
        self._fail(f"worker rank {rank} (Ray actor) stopped: {reason}")

    def _stop(self) -> None:
        try:
            self.ray.get(self.runs, timeout=_STOP_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - dead or stuck: killed below either way
            pass
        for actor in self.actors:
            self.ray.kill(actor)
        self.ray.util.remove_placement_group(self.group)
