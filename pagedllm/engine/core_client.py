"""The front's handle on one engine-core process (`core.py`): starts it, sends it messages (from a sender
thread, so the event loop never blocks on a full socket), and reads its messages on the event loop as they
arrive (`attach`). A core that exits (or whose worker ranks die: the core then exits at once) is reported by
a watchdog to `on_failure` callbacks. Data-parallel replicas are one core each, with their own KV cache and
their own tensor x pipeline world.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import threading
import weakref
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Callable

import torch.multiprocessing as mp

from pagedllm.config import EngineConfig
from pagedllm.engine.core import CoreInfo, Sender, run_engine_core
from pagedllm.engine.llm_engine import EngineStats, LLMEngine
from pagedllm.executor.spawn import main_not_rerun
from pagedllm.executor.workers import FailureReporter

logger = logging.getLogger(__name__)
_STOP_TIMEOUT_S = 30.0


class EngineCoreDiedError(RuntimeError):
    """The engine-core process has exited."""


class EngineCoreClient(FailureReporter):
    # The front tokenizes prompts (and beam search its prompts) with the same tokenizer the core has.
    tokenize_prompt = LLMEngine.tokenize_prompt

    def __init__(self, config: EngineConfig, index: int, tokenizer: Any, env: dict[str, str] | None = None,
                 engine_cls: type[LLMEngine] = LLMEngine) -> None:
        """Starts the core process; `wait_ready` finishes the start (so several cores load at once)."""
        super().__init__()
        self.config, self.index, self.tokenizer = config, index, tokenizer
        ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA context, lock or thread inherited from the front
        self._conn, child = ctx.Pipe()
        # Not a daemon: the core starts processes of its own (its worker ranks); it exits when the pipe closes.
        self.proc = ctx.Process(target=run_engine_core, args=(config, child, env or {}, engine_cls),
                                name=f"pagedllm-engine-core-{index}")
        with main_not_rerun():
            self.proc.start()
        child.close()
        self._sender = Sender(self._conn, f"pagedllm-front-sender-{index}")
        # Also at exit (or collection): multiprocessing would otherwise join a core still waiting on its pipe.
        self._stop = weakref.finalize(self, _stop_core, self.proc, self._conn, self._sender)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.vocab_size = 0
        self.eos_token_ids: set[int] = set()
        self.initial_stats: EngineStats | None = None

    def wait_ready(self) -> None:
        """Blocks until the core has loaded its engine; raises what stopped it."""
        try:
            kind, payload = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError) as error:
            self.shutdown()
            raise self._died() from error
        if kind == "error":
            self.shutdown()
            raise payload
        info: CoreInfo = payload
        self.vocab_size, self.eos_token_ids, self.initial_stats = info.vocab_size, info.eos_token_ids, info.stats
        threading.Thread(target=self._watch, name=f"pagedllm-core-watchdog-{self.index}", daemon=True).start()

    def attach(self, loop: asyncio.AbstractEventLoop, on_message: Callable[[tuple[Any, ...]], None]) -> None:
        """Hands every message of the core to `on_message`, on `loop`, as it arrives."""
        self._loop = loop

        def readable() -> None:
            try:
                while self._conn.poll():
                    on_message(pickle.loads(self._conn.recv_bytes()))
            except (EOFError, OSError):  # the core has gone: stop reading; the watchdog reports it
                loop.remove_reader(fd)

        fd = self._conn.fileno()
        loop.add_reader(fd, readable)

    def detach(self) -> None:
        """Stops reading (on the loop `attach` was given)."""
        if self._loop is not None and not self._loop.is_closed() and not self._conn.closed:
            self._loop.remove_reader(self._conn.fileno())
        self._loop = None

    def send(self, *message: Any) -> None:
        self._sender.send(message)

    @property
    def alive(self) -> bool:
        return self.failure is None and self.proc.is_alive()

    def shutdown(self) -> None:
        """Asks the core to stop its engine and exit; kills it if it does not within the timeout."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._stop()

    def _died(self) -> EngineCoreDiedError:
        self.proc.join(5)
        return EngineCoreDiedError(f"engine core {self.index} (pid {self.proc.pid}) exited with code {self.proc.exitcode}")

    def _watch(self) -> None:
        wait([self.proc.sentinel])
        self._report(self._died())


def _stop_core(proc: BaseProcess, conn: Connection, sender: Sender) -> None:
    sender.send(("shutdown",))
    sender.close()
    proc.join(_STOP_TIMEOUT_S)
    if proc.is_alive():
        proc.kill()
        proc.join()
    conn.close()
