"""The IpcConnector's data path against the copy engine's limit: `python -m pagedllm.kv_transfer.bench_ipc`.

A producer process (started separately, as a prefill instance is) fills a KV pool of the model's shape with random
values and exports it as the IpcConnector does (CUDA IPC handles; shared memory with --device cpu); this process maps
it and copies one N-token prompt's blocks into a pool of its own with the connector's `copy_blocks`, for producer
and consumer block ids scattered at random (the usual case) and both contiguous (the best case), checks the copy, and
compares each with one plain device-to-device copy of the same bytes between two local buffers. Prints seconds (the
median of --repeats), GB/s (bytes copied per second) and the ratio to the plain copy (below 1: slower). The control
messages (hello, get, release: a round trip each on one host) are not timed. Read on an H100 (llama3-8b, bf16, 4096
tokens, 512 MiB): the plain copy 0.37 ms (1440 GB/s), scattered blocks 2.2 ms (0.17 of it), contiguous 0.9 ms (0.41),
bound by the 32-64 kernel launches of a copy per layer rather than by the bytes (1024 tokens take 1.0 ms and 0.66)."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from multiprocessing.connection import Connection
from typing import Callable

import torch
import torch.multiprocessing as mp

from pagedllm.kv_transfer.ipc_pool import SharedMemoryPool, copy_blocks, export_pool, map_pool

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "configs")


def layer_shape(model: str, num_blocks: int, block_size: int) -> tuple[int, list[int]]:
    """(layers, one layer's pool shape) of a config under pagedllm/benchmarks/configs."""
    with open(os.path.join(CONFIGS, model, "config.json")) as f:
        config = json.load(f)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", config["num_attention_heads"])
    return config["num_hidden_layers"], [2, num_blocks, block_size, kv_heads, head_dim]


def _producer(conn: Connection, layers: int, shape: list[int], dtype: torch.dtype, device: str) -> None:
    """The producer's process: a random pool, exported; it lives until the consumer says so."""
    torch.set_num_threads(1)  # idle once filled: CPU threads of its own would spin beside the consumer's copies
    torch.manual_seed(0)
    shared = SharedMemoryPool([tuple(shape)] * layers, dtype) if device == "cpu" else None
    pool = shared.tensors if shared else [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
    for kv in pool:
        kv.copy_(torch.randn(shape, dtype=torch.float32).to(dtype))
    if device != "cpu":
        torch.cuda.synchronize()
    conn.send(json.dumps(export_pool(pool, shared)))
    conn.recv()


def _time(fn: Callable[[], None], repeats: int, cuda: bool) -> float:
    """The median seconds of fn over `repeats` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="the prompt whose blocks move")
    parser.add_argument("--model", default="llama3-8b", help="a config under pagedllm/benchmarks/configs")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--device", default="cuda", help="cuda (CUDA IPC) or cpu (shared memory)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    dtype, cuda = getattr(torch, args.dtype), args.device.startswith("cuda")
    n = -(-args.tokens // args.block_size)
    layers, shape = layer_shape(args.model, 2 * n, args.block_size)  # pools twice the prompt: room to scatter
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_producer, args=(theirs, layers, shape, dtype, args.device), daemon=True)
    child.start()
    source: list[torch.Tensor] = []
    try:
        info = json.loads(ours.recv())
        source = map_pool(info, dtype)
        device = source[0].device
        pool = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        nbytes = n * layers * pool[0][:, 0].numel() * pool[0].element_size()
        flat_src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        flat_dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        baseline = _time(lambda: flat_dst.copy_(flat_src), args.repeats, cuda)
        where = torch.cuda.get_device_name(device) if cuda else "cpu"
        print(f"{args.model} {args.dtype}: {args.tokens} tokens = {n} blocks x {layers} layers = "
              f"{nbytes / 2**20:.1f} MiB on {where}, {info['kind']} IPC")
        print(f"{'copy':<36}{'seconds':>12}{'GB/s':>10}{'ratio':>8}")
        print(f"{'plain device copy (same bytes)':<36}{baseline:>12.6f}{nbytes / baseline / 1e9:>10.1f}{1.0:>8.2f}")
        rng = random.Random(0)
        scattered = rng.sample(range(2 * n), n), rng.sample(range(2 * n), n)
        contiguous = list(range(n)), list(range(n, 2 * n))
        for name, (src_ids, dst_ids), max_runs in [("scattered blocks (gather/scatter)", scattered, 2),
                                                   ("contiguous blocks (slice copies)", contiguous, 2),
                                                   ("contiguous blocks (gather/scatter)", contiguous, 0)]:
            seconds = _time(lambda: copy_blocks(source, pool, src_ids, dst_ids, max_runs), args.repeats, cuda)
            check = rng.randrange(n)
            assert torch.equal(pool[-1][:, dst_ids[check]], source[-1][:, src_ids[check]]), "the copy is wrong"
            print(f"{name:<36}{seconds:>12.6f}{nbytes / seconds / 1e9:>10.1f}{baseline / seconds:>8.2f}")
    finally:
        source.clear()  # unmapped before the producer exits (else torch warns that it went first)
        ours.send("done")
        child.join(30)


if __name__ == "__main__":
    main()
