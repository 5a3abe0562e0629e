"""Priority scheduling (core/queues.py, core/scheduler.py), float32 on CPU: the policy changes when requests run, never
what they generate; equal priorities schedule step for step as fcfs; on a saturated engine late urgent requests
overtake earlier batch work (they preempt it for sequence slots and blocks); under memory pressure only the worst
priority is preempted; clear errors."""

from __future__ import annotations

import random
from typing import Any

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.llm_engine import LLMEngine
from tests.conftest import assert_clean

ARGS = dict(skip_tokenizer_init=True, max_model_len=512, max_num_batched_tokens=48)


def _prompts(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(rng.randint(4, 70))]} for _ in range(n)]


def _trace(engine: LLMEngine, prompts: list[dict[str, Any]], params: SamplingParams,
           priorities: list[int]) -> tuple[list[list[str]], list[str], dict[str, list[int]]]:
    """Each step's scheduled request ids, the order requests finished in, and their tokens."""
    schedule = engine.scheduler.schedule
    steps: list[list[str]] = []

    def recording() -> Any:
        out = schedule()
        steps.append([r.request_id for r, _ in out.scheduled])
        return out

    engine.scheduler.schedule = recording  # type: ignore[method-assign]
    for i, (prompt, priority) in enumerate(zip(prompts, priorities)):
        engine.add_request(str(i), prompt, params, priority=priority)
    finished, tokens = [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished.append(out.request_id)
                tokens[out.request_id] = out.outputs[0].token_ids
    engine.scheduler.schedule = schedule  # type: ignore[method-assign]
    return steps, finished, tokens


def test_outputs_unchanged_and_equal_priorities_are_fcfs(tiny_models: dict[str, str]) -> None:
    prompts = _prompts(20, seed=1)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    fcfs = LLM(tiny_models["llama"], num_gpu_blocks_override=14, **ARGS).llm_engine
    steps, _, expected = _trace(fcfs, prompts, params, [0] * len(prompts))
    assert fcfs.scheduler.num_preemptions > 0
    engine = LLM(tiny_models["llama"], num_gpu_blocks_override=14, scheduling_policy="priority", **ARGS).llm_engine
    same_steps, _, tokens = _trace(engine, prompts, params, [0] * len(prompts))
    assert same_steps == steps and tokens == expected
    rng = random.Random(2)
    _, _, mixed = _trace(engine, prompts, params, [rng.choice([-1, 0, 3]) for _ in prompts])
    assert mixed == expected
    assert_clean(engine)


def test_urgent_requests_overtake_batch_work(tiny_models: dict[str, str]) -> None:
    """16 batch requests fill a 4-slot engine; 4 urgent ones arrive after a few steps and finish first."""
    engine = LLM(tiny_models["llama"], max_num_seqs=4, scheduling_policy="priority", **ARGS).llm_engine
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = _prompts(20, seed=3)
    for i in range(16):
        engine.add_request(f"batch{i}", prompts[i], params, priority=1)
    finished = []
    for _ in range(3):
        finished += [o.request_id for o in engine.step() if o.finished]
    for i in range(4):
        engine.add_request(f"urgent{i}", prompts[16 + i], params, priority=0)
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert all(rid.startswith("urgent") for rid in finished[:4]), finished
    assert engine.scheduler.num_preemptions >= 4  # the running batch requests made room
    assert_clean(engine)


def test_memory_pressure_preempts_the_worst_priority(tiny_models: dict[str, str]) -> None:
    engine = LLM(tiny_models["llama"], num_gpu_blocks_override=16, scheduling_policy="priority", **ARGS).llm_engine
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    prompts = _prompts(6, seed=4)
    priorities = [0, 0, 5, 5, 5, 5]
    requests = {}
    for i, (prompt, priority) in enumerate(zip(prompts, priorities)):
        engine.add_request(str(i), prompt, params, priority=priority)
        requests[str(i)] = engine.requests[str(i)]
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.num_preemptions > 0
    assert all(requests[str(i)].num_preemptions == 0 for i in (0, 1))
    assert_clean(engine)


def test_errors(tiny_models: dict[str, str]) -> None:
    llm = LLM(tiny_models["llama"], **ARGS)
    with pytest.raises(ValueError, match="priority scheduling is off"):
        llm.generate({"prompt_token_ids": [5, 6]}, priority=[1], use_tqdm=False)
    with pytest.raises(ValueError, match="scheduling_policy"):
        LLM(tiny_models["llama"], scheduling_policy="lifo", **ARGS)
    llm = LLM(tiny_models["llama"], scheduling_policy="priority", **ARGS)
    with pytest.raises(ValueError, match="priorities"):
        llm.generate([{"prompt_token_ids": [5, 6]}] * 2, priority=[1], use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": [5, 6]}] * 2, SamplingParams(max_tokens=2), priority=[3, -2], use_tqdm=False)
    assert len(out) == 2
    assert_clean(llm.llm_engine)


def test_server_takes_priority() -> None:
    """`priority` on completions and chat reaches the engine core (its own process) under --scheduling-policy priority;
    a server without it answers 400 naming the field."""
    import openai

    from tests.server_utils import SMALL_SERVER_ARGS, ServerProcess

    server = ServerProcess([*SMALL_SERVER_ARGS, "--scheduling-policy", "priority"])
    try:
        client = server.client()
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt="Hello", max_tokens=3, extra_body={"priority": -5})
        assert out.choices[0].text
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                              extra_body={"priority": 7})
        assert chat.choices[0].message.content is not None
    finally:
        assert server.stop() == 0, server.logs()
    plain = ServerProcess(list(SMALL_SERVER_ARGS))
    try:
        with pytest.raises(openai.BadRequestError, match="priority"):
            plain.client().completions.create(model=model, prompt="Hello", max_tokens=3, extra_body={"priority": 1})
    finally:
        plain.stop()
