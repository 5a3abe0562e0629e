"""Perplexity of integer checkpoints of the bundled SmolLM2 (RESULTS.md, session 14): writes each checkpoint with the
test writers (tests/reference/int_quant.py, round to nearest; tests/reference/calibrated.py, GPTQ / SmoothQuant),
then scores it with `pagedllm bench perplexity`, beside the 16-bit model.

    python benchmarks/int_quality.py --out /tmp/int-quality gptq-g128 gptq-g128-asym ct-w8a8 ct-w8a8:sq0.8 gptq-g128:gptq

A spec is a format name of tests/reference/int_quant.py's FORMATS, optionally `:gptq` (GPTQ codes) or `:sqA`
(SmoothQuant with alpha A first, round-to-nearest codes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pagedllm.models.gguf import resolve_model  # noqa: E402
from tests.reference.calibrated import make_calibrated_checkpoint  # noqa: E402
from tests.reference.int_quant import make_int_checkpoint  # noqa: E402


def perplexity(model: str) -> str:
    cmd = ["pagedllm", "bench", "perplexity", "--model", model, "--dtype", "float32"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if line.startswith("perplexity"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+")
    parser.add_argument("--out", default="/tmp/int-quality", help="where the checkpoints are written")
    args = parser.parse_args()
    src = resolve_model(None)
    print("16-bit:", perplexity(src), flush=True)
    for spec in args.specs:
        name, _, how = spec.partition(":")
        dst = os.path.join(args.out, spec.replace(":", "-"))
        if how == "gptq":
            path, _ = make_calibrated_checkpoint(src, dst, name)
        elif how.startswith("sq"):
            path, _ = make_calibrated_checkpoint(src, dst, name, use_gptq=False, smooth_alpha=float(how[2:]))
        else:
            path, _ = make_int_checkpoint(src, dst, name)
        print(f"{spec}:", perplexity(path), flush=True)


if __name__ == "__main__":
    main()
