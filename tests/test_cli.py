"""The README's main job and the interactive chat, run as a user would (subprocesses, default model)."""

from __future__ import annotations

import os
import subprocess
import sys

ENV = {**os.environ, "PAGEDLLM_LOG_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", *args, "--max-model-len", "512", "--kv-cache-memory", str(64 << 20)],
        input=stdin, capture_output=True, text=True, timeout=300, env=ENV,
    )


def test_generate_prints_a_completion(smollm2: str) -> None:
    result = run_cli("generate", "The capital of France is", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital of France is") and "Paris" in result.stdout


def test_chat_answers_with_the_chat_template(smollm2: str) -> None:
    result = run_cli("chat", "--max-tokens", "30", stdin="What is the capital of France?\n\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_bad_arguments_give_a_readable_error(smollm2: str) -> None:
    result = run_cli("generate", "hi", "--temperature", "-1")
    assert result.returncode == 2 and "temperature" in result.stderr and "Traceback" not in result.stderr
