"""The engine core: an LLMEngine in a process of its own, stepping in a busy loop.

The server's front (HTTP, validation, tokenization, streams) lives in another process, so the step loop never
shares a GIL with uvicorn, JSON parsing and SSE formatting. Between two steps the core takes every message
the front has sent (new requests join the very next step), steps, and hands the step's outputs to a sender
thread: no step ever waits on the front. Idle, it sleeps on the pipe (and on a KV producer's wake-up).

Messages are pickled tuples over a multiprocessing pipe (a Unix socket pair), one `send_bytes` each.
Front -> core:  ("add", request_id, prompt, params, arrival_time, lora_request, priority)   the prompt tokenized by the front
                ("abort", [request_id, ...])
                ("call", call_id, fn, args)                         fn(engine, *args) between two steps
                ("shutdown",)
Core -> front:  ("ready", CoreInfo) or ("error", exception)        once, after loading
                ("added", [(request_id, exception or None), ...])   every add's verdict, before the step it joins
                ("step", [wire output, ...], EngineStats, time)    one per step
                ("result", call_id, exception or None, value)
                ("dead", exception)                                 the step loop failed; the process then exits
A step's outputs go as plain tuples (`to_wire`), without the prompt the front already holds: for 256 requests
with 512-token prompts that is 28 kB and ~1.1 ms to encode and decode, against 438 kB and ~6.6 ms for the
RequestOutputs pickled whole, and ~1.6 ms for the same tuples through msgspec (`benchmarks/wire_bench.py`).
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from pagedllm.config import EngineConfig
from pagedllm.engine.llm_engine import EngineStats, LLMEngine
from pagedllm.outputs import CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, RequestMetrics, RequestOutput

logger = logging.getLogger(__name__)

# One request's step output on the wire: (request_id, finished, num_cached_tokens, prompt_logprobs,
# (arrival, first_scheduled, first_token, last_token, finished_time), [completion, ...]), each completion
# (index, text, token_ids, cumulative_logprob, logprobs, finish_reason, stop_reason).
WireOutput = tuple[Any, ...]


@dataclass(frozen=True)
class CoreInfo:
    """What the front needs of a loaded engine: fixed for its life."""

    vocab_size: int
    eos_token_ids: set[int]
    stats: EngineStats


def to_wire(output: RequestOutput | EmbeddingRequestOutput) -> WireOutput:
    if isinstance(output, EmbeddingRequestOutput):  # (request_id, vector): a pooling request's whole output
        return output.request_id, output.outputs.embedding
    m = output.metrics
    metrics = None if m is None else (m.arrival_time, m.first_scheduled_time, m.first_token_time, m.last_token_time,
                                      m.finished_time)
    completions = [(c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs, c.finish_reason, c.stop_reason)
                   for c in output.outputs]
    return output.request_id, output.finished, output.num_cached_tokens, output.prompt_logprobs, metrics, completions


def from_wire(wire: WireOutput, prompt: str | None, prompt_token_ids: list[int]) -> RequestOutput | EmbeddingRequestOutput:
    if len(wire) == 2:
        return EmbeddingRequestOutput(wire[0], EmbeddingOutput(wire[1]), prompt_token_ids, True)
    request_id, finished, num_cached, prompt_logprobs, metrics, completions = wire
    return RequestOutput(
        request_id=request_id, prompt=prompt, prompt_token_ids=prompt_token_ids, prompt_logprobs=prompt_logprobs,
        outputs=[CompletionOutput(*c) for c in completions], finished=finished, num_cached_tokens=num_cached,
        metrics=None if metrics is None else RequestMetrics(*metrics),
    )


def portable(error: BaseException) -> BaseException:
    """The error itself if it pickles (a ValueError naming a field reaches the caller as is), else its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(error).__name__}: {error}")


class Sender:
    """Writes pickled messages to a connection from a thread of its own, so that the writer never waits for the
    reader to drain the socket (the write itself releases the GIL)."""

    def __init__(self, conn: Connection, name: str) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def send(self, message: tuple[Any, ...]) -> None:
        self._queue.put(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def close(self, timeout: float = 5.0) -> None:
        """Sends what is queued, then stops."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            try:
                self._conn.send_bytes(data)
            except OSError:  # the other side has gone; its watchdog tells the rest
                return


class EngineCore:
    """The core process's loop around one LLMEngine."""

    def __init__(self, engine: LLMEngine, conn: Connection) -> None:
        self.engine, self.conn = engine, conn
        self.out = Sender(conn, "pagedllm-core-sender")

    def run(self) -> None:
        """Steps until the front says shutdown or goes away; raises whatever broke a step."""
        engine, conn = self.engine, self.conn
        try:
            while True:
                if not engine.has_unfinished_requests():
                    self._idle()
                verdicts: list[tuple[str, BaseException | None]] = []
                while conn.poll(0):  # every message waiting, so that new requests join this very step
                    if not self._apply(pickle.loads(conn.recv_bytes()), verdicts):
                        return
                if verdicts:
                    self.out.send(("added", verdicts))
                if engine.has_unfinished_requests():
                    outputs = engine.step()
                    self.out.send(("step", [to_wire(o) for o in outputs], engine.get_stats(), time.time()))
        except EOFError:  # the front has gone
            return
        finally:
            self.out.close()

    def _idle(self) -> None:
        """Sleeps until the front speaks. A KV producer (IpcConnector) pins and unpins blocks for its consumers on
        this thread: its wake-up steps the idle engine, whose step serves them (and schedules nothing)."""
        wakeup = None if self.engine.kv_connector is None else self.engine.kv_connector.wakeup
        if wakeup is None:
            self.conn.poll(None)
            return
        while self.conn not in wait([self.conn, wakeup]):
            self.engine.step()

    def _apply(self, message: tuple[Any, ...], verdicts: list[tuple[str, BaseException | None]]) -> bool:
        kind = message[0]
        if kind == "add":
            _, request_id, prompt, params, arrival_time, lora_request, priority = message
            try:
                self.engine.add_request(request_id, prompt, params, arrival_time, lora_request, priority)
                verdicts.append((request_id, None))
            except Exception as error:  # noqa: BLE001 - fails this request only (ValueError: its input is invalid)
                verdicts.append((request_id, portable(error)))
        elif kind == "abort":
            self.engine.abort_request(message[1])
        elif kind == "call":
            _, call_id, fn, args = message
            try:
                self.out.send(("result", call_id, None, fn(self.engine, *args)))
            except Exception as error:  # noqa: BLE001 - the caller gets it
                self.out.send(("result", call_id, portable(error), None))
        else:
            assert kind == "shutdown", kind
            return False
        return True


def run_engine_core(config: EngineConfig, conn: Connection, env: dict[str, str], engine_cls: type[LLMEngine]) -> None:
    """The core process: loads the engine, reports ready (or why not), then runs the loop."""
    # Ctrl-C reaches the whole process group, and `kill -TERM -pgid` too: the front drains its requests and
    # then stops this process itself (or it sees the pipe close).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ.update(env)  # before anything touches CUDA: this replica's devices (or its share of CPU threads)
    if "OMP_NUM_THREADS" in env:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))  # torch read the variable before it was set here
    try:
        engine = engine_cls(config)
    except BaseException as error:  # noqa: BLE001 - reported to the front, which raises it
        conn.send_bytes(pickle.dumps(("error", portable(error))))
        return
    # A dead rank leaves this engine unable to step: end the core, which the front's watchdog reports.
    engine.on_failure(lambda error: os._exit(1))
    conn.send_bytes(pickle.dumps(("ready", CoreInfo(engine.vocab_size, engine.eos_token_ids, engine.get_stats()))))
    core = EngineCore(engine, conn)
    try:
        core.run()
    except BaseException as error:  # noqa: BLE001 - whatever killed the loop is reported to every request
        logger.exception("the engine loop died")
        try:
            conn.send_bytes(pickle.dumps(("dead", portable(error))))
        except OSError:
            pass
        engine.shutdown()
        os._exit(1)
    engine.shutdown()
