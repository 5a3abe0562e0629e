"""Worker ranks as local processes (torch.multiprocessing, spawn: see executor/spawn.py), watched through their
sentinels."""

from __future__ import annotations

import threading
import time
from multiprocessing.connection import wait

import torch.multiprocessing as mp

from pagedllm.config import EngineConfig
from pagedllm.executor.spawn import main_not_rerun
from pagedllm.executor.workers import Workers
from pagedllm.worker.worker import run_worker

_STOP_TIMEOUT_S = 10.0


class MultiprocWorkers(Workers):
    backend = "multiprocessing"

    def __init__(self, config: EngineConfig, port: int) -> None:
        super().__init__()
        ctx = mp.get_context("spawn")
        self.procs = [
            ctx.Process(target=run_worker, args=(config, rank, "127.0.0.1", port), name=f"pagedllm-rank{rank}", daemon=True)
            for rank in range(1, config.world_size)
        ]
        with main_not_rerun():
            for proc in self.procs:
                proc.start()
        threading.Thread(target=self._watch, name="pagedllm-watchdog", daemon=True).start()

    def _watch(self) -> None:
        ranks = {proc.sentinel: rank for rank, proc in enumerate(self.procs, start=1)}
        ready = wait(list(ranks))
        rank = ranks[ready[0]]  # type: ignore[index]
        proc = self.procs[rank - 1]
        proc.join()
        self._fail(f"worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}")

    @property
    def pids(self) -> list[int | None]:
        return [proc.pid for proc in self.procs]

    def _stop(self) -> None:
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
