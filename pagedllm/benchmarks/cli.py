"""The `bench` subcommand: `pagedllm bench throughput | latency | perplexity | embed | mm | serve | disagg`."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
from typing import Any

from pagedllm.benchmarks import BACKENDS
from pagedllm.benchmarks.workloads import SHAPES, WORKLOADS

_DESCRIPTION = (
    f"--model also takes a bundled shape ({', '.join(SHAPES)}): its config.json with random weights "
    "(--load-format dummy). Prompts are random token ids drawn with --seed."
)


def add_bench_parser(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="benchmark throughput, latency, or a running server")
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    from pagedllm.benchmarks import latency, throughput

    for kind, module, help_text in (
        ("throughput", throughput, "offline throughput: all requests at once (requests/s, tokens/s)"),
        ("latency", latency, "one stream end to end (median seconds per request, output tokens/s)"),
    ):
        parser = kinds.add_parser(kind, help=help_text, description=_DESCRIPTION, epilog=_workloads_help(kind),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common_args(parser, kind)
        module.add_arguments(parser)
        parser.set_defaults(func=module.main)
    _add_perplexity(kinds)
    _add_embed(kinds)
    _add_multimodal(kinds)
    _add_serve(kinds)
    _add_disagg(kinds)


def _add_common_args(parser: argparse.ArgumentParser, kind: str) -> None:
    from pagedllm.entrypoints.cli import add_engine_args

    add_engine_args(parser)
    # Unset (None) means "from --workload, else the default", so an explicit flag always wins.
    parser.set_defaults(load_format=None)
    names = [w.name for w in WORKLOADS.values() if w.kind == kind]
    group = parser.add_argument_group("benchmark")
    group.add_argument("--workload", choices=names, default=None, help="a named workload (see below); flags override its settings")
    group.add_argument("--backend", choices=BACKENDS, default="pagedllm",
                       help="pagedllm, hf (transformers generate), or both in this process with the ratio")
    group.add_argument("--input-len", type=int, default=None, help="prompt tokens per request")
    group.add_argument("--output-len", type=int, default=None, help="generated tokens per request (EOS is ignored)")
    group.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1.0)")
    group.add_argument("--output-json", default=None, metavar="PATH", help="write the figures, args, device and versions here")


def _workloads_help(kind: str) -> str:
    lines = [f"  {w.name}: {w.description}" for w in WORKLOADS.values() if w.kind == kind]
    return "workloads:\n" + "\n".join(lines)


def _add_perplexity(kinds: Any) -> None:
    from pagedllm.benchmarks import perplexity
    from pagedllm.entrypoints.cli import add_engine_args

    parser = kinds.add_parser("perplexity", help="perplexity of a text via prompt_logprobs (e.g. 16-bit vs --quantization fp8)",
                              description=perplexity.__doc__)
    add_engine_args(parser)
    perplexity.add_arguments(parser)
    parser.set_defaults(func=perplexity.main)


def _add_embed(kinds: Any) -> None:
    from pagedllm.benchmarks import embed
    from pagedllm.entrypoints.cli import add_engine_args

    parser = kinds.add_parser("embed", help="embedding throughput against sentence-transformers / transformers",
                              description=embed.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser)
    parser.set_defaults(model=None)
    embed.add_arguments(parser)
    parser.set_defaults(func=embed.main)


def _add_multimodal(kinds: Any) -> None:
    from pagedllm.benchmarks import multimodal
    from pagedllm.entrypoints.cli import add_engine_args

    parser = kinds.add_parser("mm", help="vision-language throughput: requests with one image each",
                              description=multimodal.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser)
    multimodal.add_arguments(parser)
    parser.set_defaults(func=multimodal.main)


def _add_serve(kinds: Any) -> None:
    """`bench serve` lives in its own module; wired in whenever that module is present."""
    if importlib.util.find_spec("pagedllm.benchmarks.serve") is None:
        return
    from pagedllm.benchmarks import serve

    parser = kinds.add_parser("serve", help="load-test a running OpenAI-compatible server")
    serve.add_arguments(parser)

    def run(args: argparse.Namespace) -> Any:
        result = serve.main(args)
        return asyncio.run(result) if inspect.iscoroutine(result) else result

    parser.set_defaults(func=run)


def _add_disagg(kinds: Any) -> None:
    from pagedllm.benchmarks import disagg

    parser = kinds.add_parser("disagg", help="disaggregated prefill against one engine under a mixed load (servers)",
                              description=disagg.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    disagg.add_arguments(parser)
    parser.set_defaults(func=disagg.main)
