"""`pagedllm serve [MODEL]`: the engine flags plus the server's own."""

from __future__ import annotations

import argparse
from typing import Any

from pagedllm.entrypoints.cli import add_engine_args


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="start the OpenAI-compatible HTTP server")
    add_engine_args(parser, model_positional=True)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: env PAGEDLLM_API_KEY)")
    group.add_argument("--served-model-name", nargs="+", default=None,
                       help="name(s) the API accepts for the model; the first is reported (default: MODEL)")
    group.add_argument("--max-n", type=int, default=16, help="largest n a request may ask for")
    group.add_argument("--max-waiting-requests", type=int, default=1024,
                       help="sequences allowed to queue beyond --max-num-seqs; past that, requests get 503")
    group.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    group.add_argument("--max-request-body-bytes", type=int, default=8 << 20, help="larger request bodies get 413")
    group.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                       help="LoRA adapters (PEFT directories) served as models of their own; needs --enable-lora")
    group.add_argument("--allow-runtime-lora-updating", action="store_true",
                       help="POST /v1/load_lora_adapter and /v1/unload_lora_adapter (also env "
                            "PAGEDLLM_ALLOW_RUNTIME_LORA_UPDATING=true)")
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='let the model decide to call tools (tool_choice "auto"); needs --tool-call-parser')
    group.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                       help="how the model writes tool calls: hermes (Qwen2.5/Qwen3 <tool_call>), llama3_json")
    group.add_argument("--structured-outputs-backend", default="xgrammar", choices=["xgrammar", "auto"],
                       help="constrained-decoding backend (xgrammar; auto = xgrammar)")
    group.add_argument("--no-dashboard", action="store_true",
                       help="do not serve the live dashboard (GET /dashboard: KV block map, queues, throughput, latencies)")
    group.add_argument("--uvicorn-log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"])
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (hermes or llama3_json).")
    from pagedllm.entrypoints.openai.api_server import run_server  # heavy imports only when serving

    run_server(args)
