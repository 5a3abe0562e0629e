"""Start `pagedllm serve` (or `pagedllm proxy`) as a real subprocess on a free 127.0.0.1 port, wait for /health,
and always stop it (pagedllm/benchmarks/server_process.py, from this checkout)."""

from __future__ import annotations

import os

from pagedllm.benchmarks.server_process import ServerProcess as _ServerProcess
from pagedllm.benchmarks.server_process import free_port

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small context and cache: quick to start, and still room for 64 short requests at once.
SMALL_SERVER_ARGS = ["--max-model-len", "256", "--kv-cache-memory", str(256 << 20)]


__all__ = ["REPO_ROOT", "SMALL_SERVER_ARGS", "ServerProcess", "free_port"]


class ServerProcess(_ServerProcess):
    """pagedllm.benchmarks.server_process's, run from this checkout."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, start_timeout: float = 240.0,
                 command: str = "serve") -> None:
        super().__init__(args, env, start_timeout, command, cwd=REPO_ROOT)
