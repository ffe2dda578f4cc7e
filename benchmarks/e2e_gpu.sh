#!/usr/bin/env bash
# End-to-end decode speed on one CUDA GPU: full attention (stock DynamicCache + SDPA, and the same
# preallocated cache layout + SDPA) against Loki (rotated-key cache + Triton decode kernels), on
# 7B-class models with random fp16 weights (weights do not change speed). Run from the repository root.
#   llama2-7b (MHA, 32 layers, 32 heads, D=128): batch 16 at prompt 4096; batch 4 at prompt 16384
#   llama3-8b (GQA 32/8): batch 16 at prompt 16384 (per query head, and one selection per KV head);
#   without QUICK=1 also batch 16 at 4096 and batch 4 at 16384
# kf = df = 0.25. Points that do not fit in GPU memory are skipped (logged), not fatal.
# Writes $OUT/e2e.csv (all rows), $OUT/e2e.json (last sweep), one log per sweep, env.log.
# The checkout is installed (benchmarks/gpu_env.sh: pip install --no-deps -e .),
# set PYTHON to choose the interpreter. QUICK=1: the first sweep only;
# ONLY=NAME: just that sweep (names below), e.g. to keep each call under a time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/e2e_gpu}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.log"

common=(--kf 0.25 --df 0.25 --new-tokens 32 --warmup 4 --profile-tokens 8 --prefill-chunk 1024
        --device cuda --dtype float16 --output-path "$OUT")
status=0
run() {  # name, then bench-e2e arguments
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && [ "$ONLY" != "$name" ]; then return; fi
  echo "== $name =="
  $PY -m lokitool bench-e2e "$@" "${common[@]}" 2>&1 | tee "$OUT/$name.log" || status=1
}
run llama2-7b_b16_p4096 --model llama2-7b --batch-size 16 --prompt-len 4096
run llama3-8b_b16_p16384 --model llama3-8b --batch-size 16 --prompt-len 16384
run llama3-8b_b16_p16384_kv --model llama3-8b --batch-size 16 --prompt-len 16384 --group kv --methods loki
if [ "${QUICK:-0}" != 1 ]; then
  run llama2-7b_b4_p16384 --model llama2-7b --batch-size 4 --prompt-len 16384
  run llama3-8b_b16_p4096 --model llama3-8b --batch-size 16 --prompt-len 4096
  run llama3-8b_b4_p16384 --model llama3-8b --batch-size 4 --prompt-len 16384
  run llama3-8b_b4_p16384_kv --model llama3-8b --batch-size 4 --prompt-len 16384 --group kv --methods loki
fi
exit $status
