"""An LLMEngine in its own process (an "engine core"), behind the part of LLMEngine's interface that
AsyncLLM drives: add_request / abort_request / step / reset_prefix_cache are one round trip each
over a pipe; the number of unfinished requests and the stats come back with every reply, so the
idle checks between steps cost nothing. Data-parallel replicas are engine cores (each with its own
KV cache, and its own TP x PP world of processes), so one front can run several of them at once.

A core that dies (or whose worker ranks die: the core then exits at once) is reported by a watchdog
to `on_failure` callbacks, and any call in progress raises.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import weakref
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.multiprocessing as mp

from pagedllm.config import EngineConfig
from pagedllm.engine.llm_engine import EngineStats, LLMEngine
from pagedllm.executor.workers import FailureReporter

logger = logging.getLogger(__name__)
_CALLS = frozenset({"add_request", "abort_request", "step", "reset_prefix_cache"})
_STOP_TIMEOUT_S = 30.0


class EngineCoreDiedError(RuntimeError):
    """The engine-core process has exited."""


class EngineCoreClient(FailureReporter):
    # Beam search tokenizes its prompts on the front, with the same tokenizer the core uses.
    tokenize_prompt = LLMEngine.tokenize_prompt

    def __init__(self, config: EngineConfig, index: int, tokenizer: Any, env: dict[str, str] | None = None) -> None:
        """Starts the core process; `wait_ready` finishes the start (so several cores load at once)."""
        super().__init__()
        self.config, self.index, self.tokenizer = config, index, tokenizer
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        # Not a daemon: the core starts processes of its own (its worker ranks); it exits when the pipe closes.
        self.proc = ctx.Process(target=_run_core, args=(config, child, env or {}), name=f"pagedllm-engine-core-{index}")
        self.proc.start()
        child.close()
        # Also at exit (or collection): multiprocessing would otherwise join a core still waiting on its pipe.
        self._stop = weakref.finalize(self, _stop_core, self.proc, self._conn)
        self._unfinished = 0
        self._stats: EngineStats | None = None
        self.vocab_size = 0
        self.eos_token_ids: set[int] = set()

    def wait_ready(self) -> None:
        kind, payload = self._recv()
        if kind == "error":
            self.shutdown()
            raise payload
        self.vocab_size, self.eos_token_ids, self._stats = payload
        threading.Thread(target=self._watch, name=f"pagedllm-core-watchdog-{self.index}", daemon=True).start()

    # ---- LLMEngine's interface ------------------------------------------------------------
    def add_request(self, *args: Any) -> None:
        self._call("add_request", *args)

    def abort_request(self, request_ids: Any) -> None:
        self._call("abort_request", list([request_ids] if isinstance(request_ids, str) else request_ids))

    def step(self) -> list:
        return self._call("step")

    def reset_prefix_cache(self) -> bool:
        return self._call("reset_prefix_cache")

    def has_unfinished_requests(self) -> bool:
        return self._unfinished > 0

    def get_num_unfinished_requests(self) -> int:
        return self._unfinished

    def get_stats(self) -> EngineStats:
        assert self._stats is not None
        return self._stats

    def shutdown(self) -> None:
        """Asks the core to stop its engine and exit; kills it if it does not within the timeout."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._stop()

    # ---- plumbing ----------------------------------------------------------------------------
    def _call(self, method: str, *args: Any) -> Any:
        if self.failure is not None:
            raise EngineCoreDiedError(str(self.failure))
        try:
            self._conn.send((method, args))
        except OSError as error:
            raise EngineCoreDiedError(f"engine core {self.index} is gone: {error!r}") from error
        kind, result, unfinished, stats = self._recv()
        self._unfinished = unfinished
        if stats is not None:
            self._stats = stats
        if kind == "error":
            raise result
        return result

    def _recv(self) -> Any:
        try:
            return self._conn.recv()
        except (EOFError, OSError) as error:
            self.proc.join(5)
            raise EngineCoreDiedError(f"engine core {self.index} (pid {self.proc.pid}) exited with code {self.proc.exitcode}") from error

    def _watch(self) -> None:
        wait([self.proc.sentinel])
        self.proc.join()
        self._report(EngineCoreDiedError(f"engine core {self.index} (pid {self.proc.pid}) exited with code {self.proc.exitcode}"))


def _stop_core(proc: BaseProcess, conn: Connection) -> None:
    try:
        conn.send(("shutdown", ()))
    except OSError:
        pass  # already gone
    proc.join(_STOP_TIMEOUT_S)
    if proc.is_alive():
        proc.kill()
        proc.join()
    conn.close()


def _portable(error: BaseException) -> BaseException:
    """The error itself if it pickles (ValueError naming a field reaches the caller as is), else its text."""
    try:
        pickle.dumps(error)
        return error
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(error).__name__}: {error}")


def _run_core(config: EngineConfig, conn: Connection, env: dict[str, str]) -> None:
    os.environ.update(env)  # before anything touches CUDA: this replica's devices (or its share of CPU threads)
    if "OMP_NUM_THREADS" in env:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # torch read the variable before it was set here
    try:
        engine = LLMEngine(config)
    except BaseException as error:  # noqa: BLE001 - reported to the front, which raises it
        conn.send(("error", _portable(error)))
        return
    # A dead rank leaves this replica unable to step: end the core, which the front's watchdog reports.
    engine.on_failure(lambda error: os._exit(1))
    conn.send(("ready", (engine.vocab_size, engine.eos_token_ids, engine.get_stats())))
    try:
        while True:
            try:
                method, args = conn.recv()
            except EOFError:  # the front has gone
                return
            if method == "shutdown":
                return
            assert method in _CALLS, method
            try:
                result = getattr(engine, method)(*args)
            except Exception as error:  # noqa: BLE001 - the caller gets it
                conn.send(("error", _portable(error), engine.get_num_unfinished_requests(), None))
                continue
            conn.send(("ok", result, engine.get_num_unfinished_requests(), engine.get_stats() if method == "step" else None))
    finally:
        engine.shutdown()
