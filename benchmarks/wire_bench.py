"""What one step's outputs cost on the engine core's wire (encode in the core + decode in the front), per format.

A decode step of `--batch` requests, each with a `--prompt-len`-token prompt and one new token with its text:
  dataclasses: the RequestOutputs themselves, pickled (prompt ids included, as a naive core would send them);
  tuples:      `engine/core.py`'s `to_wire` / `from_wire` (no prompt) with pickle, what the core sends;
  msgspec:     the same tuples as msgpack with msgspec (if installed), decoded into the same RequestOutputs.
usage: python benchmarks/wire_bench.py [--batch 256] [--prompt-len 512]
"""

from __future__ import annotations

import argparse
import pickle
import time
from typing import Any, Callable

from pagedllm.engine.core import from_wire, to_wire
from pagedllm.outputs import CompletionOutput, RequestMetrics, RequestOutput


def step_outputs(batch: int, prompt_len: int) -> list[RequestOutput]:
    return [
        RequestOutput(f"cmpl-{i:032x}-0", None, list(range(1000, 1000 + prompt_len)), None,
                      [CompletionOutput(0, " word", [4242], None, None)], False, 0,
                      RequestMetrics(1.7e9, 1.7e9 + 0.01, 1.7e9 + 0.02, 1.7e9 + 0.3))
        for i in range(batch)
    ]


def timed(fn: Callable[[], Any], repeat: int = 200) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    args = parser.parse_args()
    outputs = step_outputs(args.batch, args.prompt_len)
    prompts = {o.request_id: (o.prompt, o.prompt_token_ids) for o in outputs}
    proto = pickle.HIGHEST_PROTOCOL

    def tuples_roundtrip(data: bytes) -> list[RequestOutput]:
        return [from_wire(w, *prompts[w[0]]) for w in pickle.loads(data)]

    rows: list[tuple[str, int, float, float]] = []
    blob = pickle.dumps(outputs, proto)
    rows.append(("dataclasses+pickle", len(blob), timed(lambda: pickle.dumps(outputs, proto)), timed(lambda: pickle.loads(blob))))
    wire = pickle.dumps([to_wire(o) for o in outputs], proto)
    rows.append(("tuples+pickle", len(wire), timed(lambda: pickle.dumps([to_wire(o) for o in outputs], proto)),
                 timed(lambda: tuples_roundtrip(wire))))
    try:
        import msgspec
    except ImportError:
        msgspec = None
    if msgspec is not None:
        encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
        packed = encoder.encode([to_wire(o) for o in outputs])
        rows.append(("tuples+msgspec", len(packed), timed(lambda: encoder.encode([to_wire(o) for o in outputs])),
                     timed(lambda: [from_wire(w, *prompts[w[0]]) for w in decoder.decode(packed)])))
    print(f"one step: {args.batch} requests, {args.prompt_len}-token prompts, one new token each")
    print(f"{'format':<20}{'bytes':>10}{'encode us':>12}{'decode us':>12}{'total us':>12}")
    for name, size, enc, dec in rows:
        print(f"{name:<20}{size:>10}{enc:>12.0f}{dec:>12.0f}{enc + dec:>12.0f}")


if __name__ == "__main__":
    main()
