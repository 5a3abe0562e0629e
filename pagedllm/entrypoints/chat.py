"""`pagedllm chat`: a terminal conversation, streamed token by token, with the model's chat template."""

from __future__ import annotations

import sys
from typing import Any

from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.entrypoints.llm import render_chat
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


def run_chat(engine_kwargs: dict[str, Any], params: SamplingParams, system: str | None) -> None:
    engine = LLMEngine.from_kwargs(**engine_kwargs)
    params.output_kind = RequestOutputKind.DELTA
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    print("Chat with the model. Empty line or Ctrl-D to quit.", file=sys.stderr)
    turn = 0
    while True:
        try:
            user = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        prompt = render_chat(engine.tokenizer, messages)
        request_id = f"chat-{turn}"
        turn += 1
        engine.add_request(request_id, prompt, params.clone())
        reply = []
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    piece = output.outputs[0].text if output.outputs else ""
                    reply.append(piece)
                    print(piece, end="", flush=True)
        except KeyboardInterrupt:
            engine.abort_request(request_id)
            while engine.has_unfinished_requests():
                engine.step()
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
