"""The IpcConnector (kv_transfer/ipc.py): disaggregated prefill between two processes on one host, the producer's
blocks copied straight from its pool, float32 on the tiny llama. The producer is a real `pagedllm serve` (its engine
core idles between requests, so its wake-up serves the consumers' gets and releases); the consumers are engines in
the test process. On the CPU the pool is shared memory; the CUDA test runs the same through CUDA IPC on one GPU, its
producer an engine core process driven over its pipe (the server's core without the HTTP front).

Greedy tokens equal one engine's, one request and many at once, with chunked prefill on both sides (64-token steps);
aborted requests leave the consumer's pool empty and the producer holding no pins; a producer of another block
layout is refused with both layouts named, and a dead one costs only a local prefill."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import httpx
import pytest
import torch
import torch.multiprocessing as mp

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.engine.core import run_engine_core
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.executor.spawn import main_not_rerun
from pagedllm.kv_transfer.ipc import producer_stats
from tests.conftest import assert_clean
from tests.server_utils import ServerProcess, free_port

ARGS: dict[str, Any] = dict(skip_tokenizer_init=True, max_model_len=512, max_num_batched_tokens=64, dtype="float32")
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _prompts(seed: int, n: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 500) for _ in range(40)]  # a common head: some blocks are already here for later ones
    tails = [[rng.randrange(3, 500) for _ in range(rng.randint(3, 110))] for _ in range(n)]
    return [{"prompt_token_ids": (shared if i % 3 == 0 else []) + tail} for i, tail in enumerate(tails)]


def _full_blocks(prompts: list[dict[str, Any]]) -> list[int]:
    return [(len(p["prompt_token_ids"]) - 1) // 16 for p in prompts]


def _connector(role: str, port: int = 0) -> dict[str, Any]:
    return {"kv_connector": "IpcConnector", "kv_role": role, "kv_port": port,
            "kv_connector_extra_config": {"arrival_timeout_s": 1.0}}


def _tokens(llm: LLM, prompts: list[dict[str, Any]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


class Producer:
    """A producer server and its KV port."""

    def __init__(self, model: str, device: str, extra: list[str]) -> None:
        self.kv_port = free_port()
        self.server = ServerProcess([model, "--skip-tokenizer-init", "--dtype", "float32", "--device", device,
                                     "--max-model-len", "512", "--max-num-batched-tokens", "64", *extra,
                                     "--kv-transfer-config", json.dumps(_connector("kv_producer", self.kv_port))],
                                    start_timeout=120)

    def prefill(self, prompts: list[dict[str, Any]], transfer_ids: list[str] | None = None) -> list[dict[str, Any]]:
        """Each prompt prefilled (max_tokens 1, do_remote_decode, the transfer id if given), all at once; the answers'
        kv_transfer_params."""
        def one(prompt: dict[str, Any], transfer_id: str | None) -> dict[str, Any]:
            params = {"do_remote_decode": True} if transfer_id is None else {"do_remote_decode": True,
                                                                             "transfer_id": transfer_id}
            body = {"prompt": prompt["prompt_token_ids"], "max_tokens": 1, "temperature": 0,
                    "kv_transfer_params": params}
            answer = httpx.post(self.server.url("/v1/completions"), json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            return answer.json()["kv_transfer_params"]

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, prompts, transfer_ids or [None] * len(prompts)))

    def stats(self) -> dict[str, int]:
        return producer_stats("127.0.0.1", self.kv_port)

    def wait_unpinned(self, timeout: float = 10.0) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while (stats := self.stats())["pinned_blocks"] and time.monotonic() < deadline:
            time.sleep(0.05)
        return stats


def _consumer(model: str, **kwargs: Any) -> LLM:
    return LLM(model, kv_transfer_config=_connector("kv_consumer"), **{"num_gpu_blocks_override": 60, **ARGS, **kwargs})


def _decode(params: dict[str, Any]) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, extra_args={"kv_transfer_params": params})


@pytest.fixture(scope="module")
def producer(tiny_models: dict[str, str]) -> Iterator[Producer]:
    proc = Producer(tiny_models["llama"], "cpu", ["--num-gpu-blocks-override", "400"])
    try:
        yield proc
    finally:
        proc.server.stop()


@pytest.fixture(scope="module")
def reference(tiny_models: dict[str, str]) -> tuple[list[dict[str, Any]], list[list[int]]]:
    prompts = _prompts(0, 16)
    return prompts, _tokens(LLM(tiny_models["llama"], num_gpu_blocks_override=200, **ARGS), prompts)


def test_outputs_equal_one_engine(tiny_models: dict[str, str], producer: Producer, reference: tuple) -> None:
    prompts, expected = reference
    params = producer.prefill(prompts)
    assert params[0] == {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": producer.kv_port,
                         "streamed": True}
    consumer = _consumer(tiny_models["llama"])
    puller = consumer.llm_engine.kv_connector.puller
    decode = _decode(params[0])
    outputs = consumer.generate(prompts[:1], decode, use_tqdm=False)  # one alone, then the rest at once
    outputs += consumer.generate(prompts[1:], decode, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    blocks = _full_blocks(prompts)
    # Every prompt's full blocks came from the producer, but those of the shared head only once.
    assert puller.received_blocks == sum(blocks) - 2 * (len(prompts[::3]) - 1), puller.last_error
    assert all(o.num_cached_tokens >= 16 * n for o, n in zip(outputs, blocks))
    assert puller.transfer_bytes == puller.received_blocks * 3 * 2 * 16 * 2 * 16 * 4  # layers, K/V, tokens, heads, dim
    metrics = {m.name: m for m in consumer.get_metrics()}
    assert metrics["pagedllm:external_prefix_cache_hits"].value == 16 * puller.received_blocks
    assert_clean(consumer.llm_engine)
    assert producer.wait_unpinned() == {"leases": 0, "pinned_blocks": 0}


def test_aborts_free_both_sides(tiny_models: dict[str, str], producer: Producer, reference: tuple) -> None:
    prompts = _prompts(1, 12)
    params = producer.prefill(prompts)
    consumer = _consumer(tiny_models["llama"])
    engine = consumer.llm_engine
    puller = engine.kv_connector.puller
    decode = _decode(params[0])
    # Pinned by the producer while the consumer's request waits for its copy, released by the abort.
    engine.add_request("held", prompts[0], decode)
    deadline = time.monotonic() + 10
    while not puller.pending["held"].future.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert producer.stats()["pinned_blocks"] == _full_blocks(prompts)[0]
    engine.abort_request("held")
    # Aborted before their answer came, between answer and step, and after some steps (running or decoding).
    for i, prompt in enumerate(prompts[1:]):
        engine.add_request(str(i), prompt, decode)
    engine.abort_request(["0", "1"])
    engine.step()
    engine.abort_request(["2", "3"])
    for _ in range(3):
        engine.step()
    engine.abort_request([str(i) for i in range(4, 11, 2)])
    while engine.has_unfinished_requests():
        engine.step()
    assert_clean(engine)
    assert not puller.pending
    assert producer.wait_unpinned() == {"leases": 0, "pinned_blocks": 0}


def _streamed_run(engine: LLMEngine, producer: Any, prompts: list[dict[str, Any]], ids: list[str],
                  where: dict[str, Any], sent: list[int]) -> dict[str, Any]:
    """The proxy's streamed exchange by hand: the consumer `engine` gets every prompt under its transfer id first,
    then steps to the end while the producer prefills the prompts in `sent` (another thread); the finished outputs
    by request id."""
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, _decode({**where, "transfer_id": ids[i]}))
    with ThreadPoolExecutor(1) as pool:
        prefilled = pool.submit(producer.prefill, [prompts[i] for i in sent], [ids[i] for i in sent])
        outputs = {}
        while engine.has_unfinished_requests():
            outputs |= {o.request_id: o for o in engine.step() if o.finished}
        prefilled.result()
    return outputs


def test_streamed_pull_while_the_producer_computes(tiny_models: dict[str, str], producer: Producer) -> None:
    """The proxy's streamed exchange: the consumer asks for a transfer id before the producer has the request; the
    producer answers part by part as its 64-token steps reach the prompt's blocks, the consumer copies each part and
    only then schedules the request. A transfer id the producer never gets ends empty after its arrival timeout, and
    that request is prefilled here."""
    prompts = _prompts(7, 6)
    expected = _tokens(LLM(tiny_models["llama"], num_gpu_blocks_override=200, **ARGS), prompts)
    consumer = _consumer(tiny_models["llama"])
    engine, puller = consumer.llm_engine, consumer.llm_engine.kv_connector.puller
    where = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": producer.kv_port, "streamed": True}
    ids = [f"stream-{i}" if i != 1 else "never-sent" for i in range(len(prompts))]  # prompt 1 shares no head
    sent = [i for i in range(len(prompts)) if i != 1]
    outputs = _streamed_run(engine, producer, prompts, ids, where, sent)
    assert [outputs[str(i)].outputs[0].token_ids for i in range(len(prompts))] == expected
    blocks = _full_blocks(prompts)
    streamed = sum(blocks[i] for i in sent)  # the shared head of prompts 0 and 3 is copied once or twice
    assert streamed - 2 <= puller.received_blocks <= streamed, puller.last_error
    assert puller.parts_received > len(prompts)  # the streamed ones came in several parts
    assert outputs["1"].num_cached_tokens == 0  # its transfer never came: computed here
    assert all(outputs[str(i)].num_cached_tokens >= 16 * blocks[i] for i in sent)
    # Aborted mid-stream: a prompt whose head the producer holds, under an id it never gets (the head comes at once,
    # the stream stays open for the rest): the copied part goes back here, the pins there.
    held = _prompts(8, 1)
    producer.prefill(held)
    longer = {"prompt_token_ids": held[0]["prompt_token_ids"] + list(range(3, 50))}
    engine.add_request("mid", longer, _decode({**where, "transfer_id": "never-sent-2"}))
    while not puller.pending["mid"].future.done():
        time.sleep(0.01)
    engine.step()
    assert puller.pending["mid"].launched and puller.pending["mid"].future.result().more
    assert producer.stats()["pinned_blocks"] == _full_blocks(held)[0]
    engine.abort_request("mid")
    engine.step()
    assert_clean(engine)
    assert producer.wait_unpinned() == {"leases": 0, "pinned_blocks": 0}


def test_layout_mismatch_refused(tiny_models: dict[str, str], producer: Producer, reference: tuple) -> None:
    prompts, expected = reference
    params = producer.prefill(prompts[:4])
    other = LLM(tiny_models["llama"], kv_transfer_config=_connector("kv_consumer"), block_size=32,
                num_gpu_blocks_override=40, **ARGS)
    assert _tokens(other, prompts[:4], _decode(params[0])) == expected[:4]  # prefilled locally
    puller = other.llm_engine.kv_connector.puller
    assert puller.received_blocks == 0 and "refused" in puller.last_error
    assert "'block_size': 16" in puller.last_error and "'block_size': 32" in puller.last_error
    assert_clean(other.llm_engine)
    with pytest.raises(ValueError, match="one rank"):
        LLM(tiny_models["llama"], kv_transfer_config=_connector("kv_both"), tensor_parallel_size=2, **ARGS)


def test_dead_producer_prefills_locally(tiny_models: dict[str, str], producer: Producer, reference: tuple) -> None:
    """The module's last test: kills the producer (its engine core too), after the consumer has mapped its pool."""
    prompts, expected = reference
    params = producer.prefill(prompts[:8])
    consumer = _consumer(tiny_models["llama"])
    assert _tokens(consumer, prompts[:2], _decode(params[0])) == expected[:2]
    os.killpg(producer.server.proc.pid, signal.SIGKILL)
    producer.server.proc.wait(10)
    assert _tokens(consumer, prompts[2:8], _decode(params[0])) == expected[2:8]
    assert consumer.llm_engine.kv_connector.puller.last_error is not None
    assert_clean(consumer.llm_engine)


class CoreProducer:
    """A producer engine core in a process of its own (what `pagedllm serve` runs, without the HTTP front), driven
    over its pipe as the front drives it."""

    def __init__(self, **kwargs: Any) -> None:
        self.kv_port = free_port()
        config = EngineConfig.from_kwargs(kv_transfer_config=_connector("kv_producer", self.kv_port), **kwargs)
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=run_engine_core, args=(config, child, {}, LLMEngine), daemon=True)
        with main_not_rerun():
            self.proc.start()
        child.close()
        kind, payload = pickle.loads(self.conn.recv_bytes())
        assert kind == "ready", payload

    def prefill(self, prompts: list[dict[str, Any]], transfer_ids: list[str] | None = None) -> dict[str, Any]:
        for i, prompt in enumerate(prompts):
            transfer = {"do_remote_decode": True} if transfer_ids is None else {"do_remote_decode": True,
                                                                                "transfer_id": transfer_ids[i]}
            params = SamplingParams(temperature=0, max_tokens=1, extra_args={"kv_transfer_params": transfer})
            self.conn.send_bytes(pickle.dumps(("add", str(i), prompt, params, time.time(), None, 0)))
        finished: set[str] = set()
        while len(finished) < len(prompts):
            message = pickle.loads(self.conn.recv_bytes())
            assert message[0] != "added" or all(error is None for _, error in message[1]), message
            if message[0] == "step":
                finished |= {wire[0] for wire in message[1] if wire[1]}
        return {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": self.kv_port}

    def stop(self) -> None:
        self.conn.send_bytes(pickle.dumps(("shutdown",)))
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ipc_between_processes_on_one_gpu(tiny_models: dict[str, str]) -> None:
    """The same on one GPU through CUDA IPC: a producer engine core in a spawned process (a fresh interpreter, not a
    fork) exports its pool; this process maps it and copies on a side stream."""
    gpu = dict(ARGS, device="cuda", kv_cache_memory=16 << 20, enforce_eager=True)
    prompts = _prompts(2, 16)
    expected = _tokens(LLM(tiny_models["llama"], **gpu), prompts)
    producer = CoreProducer(model=tiny_models["llama"], **gpu)
    try:
        params = producer.prefill(prompts)
        consumer = LLM(tiny_models["llama"], kv_transfer_config=_connector("kv_consumer"), **gpu)
        outputs = consumer.generate(prompts, _decode(params), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected
        puller = consumer.llm_engine.kv_connector.puller
        assert puller.received_blocks == sum(_full_blocks(prompts)) - 2 * (len(prompts[::3]) - 1), puller.last_error
        assert all(o.num_cached_tokens >= 16 * n for o, n in zip(outputs, _full_blocks(prompts)))
        assert puller.copy_seconds > 0
        assert_clean(consumer.llm_engine)
        deadline = time.monotonic() + 10
        while producer_stats("127.0.0.1", producer.kv_port)["pinned_blocks"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert producer_stats("127.0.0.1", producer.kv_port) == {"leases": 0, "pinned_blocks": 0}
    finally:
        producer.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "piecewise-graphs"])
def test_cuda_streamed_layer_by_layer(tiny_models: dict[str, str], eager: bool) -> None:
    """The streamed exchange through CUDA IPC: the consumer asks first; each part is copied layer by layer after the
    producer's per-layer events (recorded after each layer's K/V write, eagerly or between the pieces of piecewise
    graphs), while the producer's later layers and chunks still run. Tokens equal one engine's."""
    gpu = dict(ARGS, device="cuda", kv_cache_memory=16 << 20, enforce_eager=eager)
    prompts = _prompts(3, 16)
    expected = _tokens(LLM(tiny_models["llama"], **gpu), prompts)
    producer = CoreProducer(model=tiny_models["llama"], **gpu)
    try:
        consumer = LLM(tiny_models["llama"], kv_transfer_config=_connector("kv_consumer"), **gpu)
        engine, puller = consumer.llm_engine, consumer.llm_engine.kv_connector.puller
        where = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": producer.kv_port}
        ids = [f"cuda-{i}" for i in range(len(prompts))]
        outputs = _streamed_run(engine, producer, prompts, ids, where, list(range(len(prompts))))
        assert [outputs[str(i)].outputs[0].token_ids for i in range(len(prompts))] == expected
        blocks = _full_blocks(prompts)
        assert sum(blocks) - 2 * (len(prompts[::3]) - 1) <= puller.received_blocks <= sum(blocks), puller.last_error
        assert puller.parts_received > len(prompts)
        assert_clean(engine)
    finally:
        producer.stop()
