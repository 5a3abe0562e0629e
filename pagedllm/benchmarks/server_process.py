"""Start `pagedllm serve` (or `pagedllm proxy`) as a real subprocess on a free 127.0.0.1 port, wait for /health,
and always stop it: what `bench disagg` runs its instances with, and the tests their servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None, start_timeout: float = 240.0,
                 command: str = "serve", cwd: str | None = None) -> None:
        """command: the `pagedllm` subcommand (serve, or proxy), given --host, --port and --uvicorn-log-level."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="pagedllm-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", command, *args,
               "--host", "127.0.0.1", "--port", str(self.port), "--uvicorn-log-level", "warning"]
        full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        # Its own session, so teardown can kill the whole group should anything survive.
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_healthy(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url("/health"), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.logs()}")

    def url(self, path: str) -> str:
        return self.base_url + path

    def logs(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-6000:]

    def client(self, **kwargs: Any) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.url("/v1"), api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)

    def async_client(self, **kwargs: Any) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.url("/v1"), api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL to the whole group after `timeout`; returns the exit code. Whatever of the group
        outlives the server (an engine process of its own) is killed too, so that its memory is free afterwards."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group is gone
            pass
        self.log.close()
        return self.proc.returncode
