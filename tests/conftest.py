import os

import pytest

from pagedllm.engine.llm_engine import LLMEngine
from tests.reference.models import make_tiny_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, str(root / arch)) for arch in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def smollm2() -> str:
    from pagedllm.models.gguf import resolve_model

    return resolve_model(None)


@pytest.fixture
def no_tf32() -> object:
    """Full float32 matmuls on the GPU while the test runs (GPU checks against transformers)."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def assert_clean(engine: LLMEngine) -> None:
    """After a workload: no request left anywhere and every KV block back in the pool."""
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.kv_cache.num_used_blocks == 0
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    assert not engine.kv_cache.block_tables
    engine.kv_cache.pool.check()
