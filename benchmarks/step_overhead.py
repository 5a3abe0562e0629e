"""Per-step CPU overhead of the engine on a decode-heavy batch, with a tiny random model so that the
model's own time is small: every step is timed around `LLMEngine.step`, and the time spent inside
the model's forward, the LM head and the sampler is subtracted.

    python benchmarks/step_overhead.py [--requests 256] [--steps 50] [--async-scheduling {0,1}] [--output-kind final|delta]
        [--temperature 0.0] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from typing import Any, Callable

import torch


class _Timer:
    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def main() -> None:
    from pagedllm.engine.llm_engine import LLMEngine
    from pagedllm.sampling_params import RequestOutputKind, SamplingParams
    from tests.reference.models import make_tiny_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--async-scheduling", type=int, choices=[0, 1], default=None)
    parser.add_argument("--output-kind", choices=["final", "delta"], default="final")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadiest on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = make_tiny_model("llama", args.model_dir or tempfile.mkdtemp(prefix="pagedllm-tiny-"))
    kwargs: dict[str, Any] = dict(model=path, skip_tokenizer_init=True, kv_cache_memory=64 << 20, max_model_len=1024, max_num_seqs=args.requests)
    if args.async_scheduling is not None:
        kwargs["async_scheduling"] = bool(args.async_scheduling)
    engine = LLMEngine.from_kwargs(**kwargs)
    runner, timer = engine.runner, _Timer()
    runner.model.forward = timer.wrap(runner.model.forward)
    runner.model.compute_logits = timer.wrap(runner.model.compute_logits)
    sampler = runner.sampler
    runner.sampler = timer.wrap(sampler)

    kind = RequestOutputKind.FINAL_ONLY if args.output_kind == "final" else RequestOutputKind.DELTA
    params = SamplingParams(temperature=args.temperature, max_tokens=args.steps + 50, ignore_eos=True, output_kind=kind)
    for i in range(args.requests):
        engine.add_request(str(i), {"prompt_token_ids": [3 + (i + j) % 500 for j in range(args.prompt_len)]}, params)
    while engine.generation_tokens < args.requests:  # prefill until every request decodes
        engine.step()
    totals, models = [], []
    for _ in range(args.steps):
        timer.seconds = 0.0
        start = time.perf_counter()
        engine.step()
        totals.append(time.perf_counter() - start)
        models.append(timer.seconds)
    overheads = [t - m for t, m in zip(totals, models)]
    engine.abort_request([str(i) for i in range(args.requests)])
    while engine.has_unfinished_requests():
        engine.step()
    print(json.dumps({
        "async_scheduling": getattr(engine.config, "async_scheduling", None), "requests": args.requests, "steps": args.steps,
        "output_kind": args.output_kind, "temperature": args.temperature, "torch_threads": torch.get_num_threads(),
        "step_ms_median": round(1e3 * statistics.median(totals), 3),
        "model_ms_median": round(1e3 * statistics.median(models), 3),
        "overhead_ms_median": round(1e3 * statistics.median(overheads), 3),
        "overhead_ms_min": round(1e3 * min(overheads), 3),
    }))


if __name__ == "__main__":
    main()
