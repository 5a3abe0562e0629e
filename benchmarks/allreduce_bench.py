"""All-reduce time per engine step under tensor parallelism, measured with NCCL on this machine's GPUs.

A TP step does two all-reduces of [tokens, hidden] per layer (after attention's o_proj and the MLP's
down_proj). This times one layer's worth, 2 x layers all-reduces, inside a CUDA graph as the decode
graphs replay them, for the step sizes of W1 (decode batches up to 512, prefill steps of 16384 tokens):

    python benchmarks/allreduce_bench.py --tp 2 --hidden 8192 --layers 80 [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TOKENS = (1, 8, 64, 256, 512, 2048, 16384)


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=args.tp, device_id=torch.device("cuda", rank))
    calls = 2 * args.layers
    rows = []
    for tokens in TOKENS:
        x = torch.randn(tokens, args.hidden, dtype=torch.bfloat16, device="cuda")
        for _ in range(3):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                dist.all_reduce(x)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        reps = 10
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        step_ms = start.elapsed_time(end) / reps
        per_call_us = 1000 * step_ms / calls
        nbytes = x.numel() * x.element_size()
        bus_gbs = nbytes * 2 * (args.tp - 1) / args.tp / (per_call_us * 1e-6) / 1e9
        rows.append(dict(tokens=tokens, bytes=nbytes, per_call_us=round(per_call_us, 2), per_step_ms=round(step_ms, 3), bus_GB_s=round(bus_gbs, 1)))
        del graph
    if rank == 0:
        result = dict(tp=args.tp, hidden=args.hidden, layers=args.layers, all_reduces_per_step=calls, device=torch.cuda.get_device_name(),
                      nccl=".".join(map(str, torch.cuda.nccl.version())), rows=rows)
        print(json.dumps(result, indent=1))
        if args.out:
            json.dump(result, open(args.out, "w"), indent=1)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    mp.spawn(worker, args=(args, 29500 + os.getpid() % 1000), nprocs=args.tp)


if __name__ == "__main__":
    main()
