#!/usr/bin/env bash
# End-to-end decode speed on one CUDA GPU in the static loop (sparse/static.py: preallocated cache,
# lengths on the GPU, the whole step one CUDA graph replay): full attention (kernels/decode_full.py)
# against Loki (kernels/loki_decode, keys in the two-plane layout), 7B-class shapes with random fp16
# weights (weights do not change speed), kf = df = 0.25, each row next to its memory floor.
#   check              greedy tokens: graph vs plain steps, vs the eager loops (benchmarks/e2e_check.py)
#   llama3-8b_b1       batch 1 at 4k, 32k, 64k, 128k, one selection per KV head
#   llama3-8b_b16      batch 16 at 4k, 8k, 16k, one selection per KV head
#   llama2-7b          MHA: batch 16 and 8 at 4k and 16k (batch 16 at 16k needs a 137 GB cache: skipped)
#   compiled           llama3-8b batch 16 and 1 at 16k and 32k with the norms and MLPs compiled (--compile)
#   llama3-8b_b16_head batch 16 at 16k, Loki with one selection per query head
# Points that do not fit in GPU memory are skipped (logged), not fatal. The old eager loop stays
# available: --methods full,full-prealloc,loki.
# Writes $OUT/e2e.csv (all rows), $OUT/e2e.json (last sweep), one log per sweep, env.log.
# ONLY=NAME[,NAME]: just those sweeps (to keep each call under a time limit). PYTHON: the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/e2e_gpu}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.log"

common=(--kf 0.25 --df 0.25 --new-tokens 32 --warmup 4 --eager-tokens 2 --device cuda --dtype float16 --output-path "$OUT")
status=0
selected() { [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$1,"* ]]; }
run() {  # name, then bench-e2e arguments
  local name=$1; shift
  selected "$name" || return 0
  echo "== $name =="
  $PY -m lokitool bench-e2e "$@" "${common[@]}" 2>&1 | tee "$OUT/$name.log" || status=1
}
if selected check; then
  echo "== check =="
  # the kernels on this GPU first; if the fused cache write fails, the sweeps fall back to PyTorch ops
  (cd tests && $PY -m pytest test_kernel_decode_full.py -q -p no:cacheprovider 2>&1 | tail -2) | tee "$OUT/check.log"
  written=$(cd tests && $PY -m pytest test_kernel_cache_write.py -q -p no:cacheprovider 2>&1 | tail -2)
  echo "$written" | tee -a "$OUT/check.log"
  if ! echo "$written" | grep -q " passed" || echo "$written" | grep -qE "failed|error"; then
    export LOKITOOL_FUSED_WRITE=0
    echo "kernels/cache_write.py failed its tests: LOKITOOL_FUSED_WRITE=0 for what follows" | tee -a "$OUT/check.log"
  fi
  $PY benchmarks/e2e_check.py 2>&1 | tee -a "$OUT/check.log" || status=1
fi
run llama3-8b_b16 --model llama3-8b --batch-size 16 --prompt-len 4096,8192,16384 --group kv
run llama3-8b_b1 --model llama3-8b --batch-size 1 --prompt-len 4096,32768,65536,130000 --group kv
run llama2-7b --model llama2-7b --batch-size 16,8 --prompt-len 4096,16384
run compiled --model llama3-8b --batch-size 16,1 --prompt-len 16384,32768 --group kv --compile
run llama3-8b_b16_head --model llama3-8b --batch-size 16 --prompt-len 16384 --methods loki-graph
exit $status
