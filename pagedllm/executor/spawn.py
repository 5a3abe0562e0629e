"""Processes started fresh (spawn) without running the user's main script again.

A spawned child imports the parent's main module before its target, so a plain script without
`if __name__ == "__main__":` that builds an engine would build another in every child (multiprocessing's
bootstrap error, then a dead worker rank). Our children's targets and arguments all live in pagedllm, so the
main module is hidden from multiprocessing while a child starts: scripts work as they do with vLLM. Spawn, not
fork, because the parent may hold a CUDA context, locks or OpenMP threads that a forked child would inherit broken.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


@contextlib.contextmanager
def main_not_rerun() -> Iterator[None]:
    """Around `Process.start()` of a spawn context: the child does not run the parent's main module."""
    main = sys.modules["__main__"]
    saved = {name: main.__dict__[name] for name in ("__file__", "__spec__") if name in main.__dict__}
    main.__dict__.pop("__file__", None)  # multiprocessing re-runs a main script by its path
    main.__dict__["__spec__"] = None  # ... and a `python -m` main by its module name
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)
