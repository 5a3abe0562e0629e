"""Ranks 1..N-1 of an engine's tensor x pipeline world, started by the engine before its driver
(rank 0, in the engine process) joins. A watchdog reports the first rank to die: the engine then
fails loudly (its next step raises; an AsyncLLM fails every request and reports unhealthy) rather
than wait on a collective that will never complete."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import torch

from pagedllm.config import EngineConfig
from pagedllm.distributed.communication import broadcast_object
from pagedllm.distributed.parallel_state import ParallelState, create_store, destroy_distributed, init_distributed, wait_for_workers
from pagedllm.worker.worker import share_cpu_threads

logger = logging.getLogger(__name__)
FailureCallback = Callable[[BaseException], None]


class WorkerDiedError(RuntimeError):
    """A rank of the engine's world has exited."""


class FailureReporter:
    """The first fatal failure of a process the engine needs (a rank, an engine core), told once to every
    callback; nothing is a failure once shutdown has begun (`_closing`)."""

    def __init__(self) -> None:
        self.failure: BaseException | None = None
        self._callbacks: list[FailureCallback] = []
        self._lock = threading.Lock()
        self._closing = False

    def on_failure(self, callback: FailureCallback) -> None:
        """`callback(error)` runs (on the watching thread) at the failure; at once if it has happened."""
        with self._lock:
            failure = self.failure
            if failure is None:
                self._callbacks.append(callback)
        if failure is not None:
            callback(failure)

    def _report(self, failure: BaseException) -> None:
        with self._lock:
            if self._closing or self.failure is not None:
                return
            self.failure = failure
            callbacks = list(self._callbacks)
        logger.error("%s: the engine cannot continue", failure)
        for callback in callbacks:
            callback(failure)


class Workers(FailureReporter):
    """Base of the executors: failure reporting and the driver's side of start and shutdown."""

    backend = ""

    def __init__(self) -> None:
        super().__init__()
        self.store: Any = None  # the driver's rendezvous store, which the process group keeps using
        self.state = ParallelState()  # the driver's place in the world, once joined
        self.driver_threads: int | None = None  # the driver's CPU threads before it shared the cores

    def check_alive(self) -> None:
        if self.failure is not None:
            raise WorkerDiedError(str(self.failure))

    def _fail(self, message: str) -> None:
        self._report(WorkerDiedError(message))

    def shutdown(self) -> None:
        """Tells the ranks to leave their loop, waits for them (killing stragglers) and leaves the world."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        if self.failure is None and self.state.world_size > 1:  # joined, and every rank is listening
            try:
                broadcast_object(self.state, None)
            except Exception:  # noqa: BLE001 - a rank died meanwhile: it is stopped below anyway
                logger.warning("could not tell the workers to stop; stopping them", exc_info=True)
        self._stop()
        destroy_distributed()
        if self.driver_threads is not None:
            torch.set_num_threads(self.driver_threads)

    def _stop(self) -> None:
        raise NotImplementedError


def start_workers(config: EngineConfig) -> Workers:
    """Starts ranks 1..N-1 with the configured backend and joins the driver to their world."""
    store = create_store(config.world_size)
    workers: Workers
    if config.distributed_executor_backend == "ray":
        from pagedllm.executor.ray_workers import RayWorkers

        workers = RayWorkers(config, store.port)
    else:
        from pagedllm.executor.multiproc import MultiprocWorkers

        workers = MultiprocWorkers(config, store.port)
    try:
        wait_for_workers(store, config.world_size, workers.check_alive)
        device = torch.device(config.device)
        if device.type == "cpu":
            workers.driver_threads = torch.get_num_threads()
            share_cpu_threads(config.world_size)
        workers.state = init_distributed(store, 0, config.tensor_parallel_size, config.pipeline_parallel_size, device,
                                         config.symm_all_reduce_dtype)
    except BaseException:
        workers.shutdown()
        raise
    workers.store = store
    logger.info("started %d worker rank(s) with %s (tensor_parallel_size=%d, pipeline_parallel_size=%d)",
                config.world_size - 1, workers.backend, config.tensor_parallel_size, config.pipeline_parallel_size)
    return workers

