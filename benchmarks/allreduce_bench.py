"""All-reduce time per engine step under tensor parallelism, measured with NCCL on this machine's GPUs.

A TP step does two all-reduces of [tokens, hidden] per layer (after attention's o_proj and the MLP's
down_proj). This times one layer's worth, 2 x layers all-reduces, inside a CUDA graph as the decode
graphs replay them, for the step sizes of W1 (decode batches up to 512, prefill steps of 16384 tokens),
through NCCL and through the symmetric-memory one-shot path (messages up to its 4 MB buffer):

    python benchmarks/allreduce_bench.py --tp 2 --hidden 8192 --layers 80 [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pagedllm.distributed.symm_all_reduce import SymmAllReduce

TOKENS = (1, 8, 64, 256, 512, 2048, 16384)


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=args.tp, device_id=torch.device("cuda", rank))
    calls = 2 * args.layers
    group = dist.group.WORLD
    symm = SymmAllReduce(group, torch.bfloat16, torch.device("cuda", rank))
    paths = {"nccl": lambda x: dist.all_reduce(x), "symm_one_shot": symm}
    rows = []
    for tokens in TOKENS:
        x = torch.randn(tokens, args.hidden, dtype=torch.bfloat16, device="cuda")
        nbytes = x.numel() * x.element_size()
        row: dict = dict(tokens=tokens, bytes=nbytes)
        for name, reduce in paths.items():
            if name != "nccl" and not symm.fits(x):
                continue
            for _ in range(3):
                reduce(x)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    reduce(x)
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
            row[name] = dict(per_call_us=round(per_call_us, 2), per_step_ms=round(step_ms, 3))
            del graph
        if rank == 0:
            print(json.dumps(row))
        rows.append(row)
    if rank == 0:
        result = dict(tp=args.tp, hidden=args.hidden, layers=args.layers, all_reduces_per_step=calls, device=torch.cuda.get_device_name(),
                      nccl=".".join(map(str, torch.cuda.nccl.version())), rows=rows)
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
