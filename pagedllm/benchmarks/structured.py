"""`pagedllm bench throughput --structured-output json`: the same batch with every request held to a JSON schema, and
free, in one process; reports the output tokens/s ratio and the grammar compile times (first and cached).

A grammar decides where its output ends (EOS only once the JSON is complete), so the constrained run goes first and
the free run then generates exactly as many tokens per request (ignore_eos, max_tokens = that request's length): both
runs do the same work but for the masks.
"""

from __future__ import annotations

import time
from typing import Any

from pagedllm.benchmarks import BenchSetup, release_memory

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3},
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "hobbies", "employed"],
}
_OTHER = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"enum": ["a", "b"]}}, "required": ["x", "y"]}


def _compile_times(llm: Any) -> dict[str, float]:
    """Seconds to a ready grammar: the very first (builds the vocabulary tables too), a new schema after that, and a
    schema already compiled (the cache)."""
    from pagedllm import StructuredOutputsParams

    manager = llm.llm_engine.structured_output
    out = {}
    for name, schema in (("first_compile_s", SCHEMA), ("new_schema_compile_s", _OTHER), ("cached_s", SCHEMA)):
        start = time.perf_counter()
        manager.validate(StructuredOutputsParams(json=schema)).result()
        out[name] = time.perf_counter() - start
    return out


def run_structured(setup: BenchSetup, num_prompts: int, max_tokens: int, temperature: float) -> dict[str, Any]:
    from pagedllm import LLM, SamplingParams, StructuredOutputsParams
    from pagedllm.entrypoints.llm import render_chat

    llm = LLM(**setup.llm_kwargs)
    tokenizer = llm.get_tokenizer()
    if tokenizer is None:
        raise ValueError("--structured-output needs a model with a tokenizer.")
    prompts = [render_chat(tokenizer, [{"role": "user", "content": f"Describe person number {i} as JSON: name, age, "
                                        f"city, hobbies, employed."}]) for i in range(num_prompts)]
    compile_times = _compile_times(llm)
    constrained = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=0,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    llm.generate(prompts[:8], constrained, use_tqdm=False)  # warm-up, both paths
    llm.generate(prompts[:8], SamplingParams(temperature=temperature, max_tokens=8, ignore_eos=True), use_tqdm=False)
    figures: dict[str, Any] = {}
    for name in ("json_schema", "free"):
        if name == "json_schema":
            params: Any = constrained
        else:  # the same token counts as the constrained run, request by request
            params = [SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True, seed=0) for n in lengths]
        llm.reset_prefix_cache()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        lengths = [len(o.outputs[0].token_ids) for o in outputs]
        tokens = sum(lengths)
        figures[name] = {"elapsed_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
                         "finished_stop": sum(o.outputs[0].finish_reason == "stop" for o in outputs)}
        print(f"[{name:>11}] {num_prompts} requests, {tokens} output tokens in {elapsed:.2f} s: "
              f"{tokens / elapsed:.1f} output tokens/s")
    ratio = figures["json_schema"]["output_tokens_per_s"] / figures["free"]["output_tokens_per_s"]
    figures["ratio_json_over_free"] = ratio
    figures["grammar_compile"] = compile_times
    print(f"json schema / free: {ratio:.3f}x output tokens/s; grammar compile: first {compile_times['first_compile_s'] * 1e3:.1f} ms "
          f"(incl. vocabulary tables), new schema {compile_times['new_schema_compile_s'] * 1e3:.1f} ms, "
          f"cached {compile_times['cached_s'] * 1e3:.3f} ms")
    del llm
    release_memory(setup.config.device)
    return figures
