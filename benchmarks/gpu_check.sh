#!/usr/bin/env bash
# One GPU check of the Loki decode kernels, run from the repository root on a CUDA machine:
#   1. the kernel tests (tests/test_kernel_*.py, test_prefill.py, test_architectures_kernels.py) compiled,
#      then the two selection modes against exact top-k and each other (benchmarks/select_modes.py),
#   2. `lokitool bench` at the shapes of issue 5 (llama2-13b attention: H=40, D=128, fp16,
#      kf = df = 0.25, batch 1 and 16, context 4096 / 16384 / 65536), then a GQA point and a
#      comparison of loki-triton's two key layouts (CUDA-graph and plain-launch medians),
#   3. the host time of one loki_decode call (benchmarks/host_overhead.py),
#   4. each kernel's chosen config, registers and spills (benchmarks/kernel_info.py),
#   5. seconds per 4096-token window of `eval --ppl` on a random-weight llama2-7b, torch reference
#      against the Triton path (benchmarks/eval_speed.py; skipped with EVAL=0).
# Logs, bench.csv, bench.json, bench.png and host_overhead.json go to $OUT (default runs/gpu_check).
# The checkout is installed first (benchmarks/gpu_env.sh: pip install --no-deps -e .);
# set PYTHON to choose the interpreter.
# Quick mode: QUICK=1 benchmarks B=1 and 16 at 4096 and 16384, no layout comparison, no kernel_info.
# SWEEP=1: step 2 is the context sweep of benchmarks/bench_sweep.sh instead (1k-128k, both shapes,
# into $OUT/sweep); STAGES picks steps (default: tests modes bench host info eval).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.log"

status=0
STAGES=" ${STAGES:-tests modes bench host info eval} "
want() { [[ "$STAGES" == *" $1 "* ]]; }
if want tests; then
  echo "== kernel tests (compiled) =="
  $PY -m pytest tests/test_kernel_score.py tests/test_kernel_select.py tests/test_kernel_attention.py tests/test_kernel_decode.py \
    tests/test_kernel_decode_full.py tests/test_kernel_cache_write.py tests/test_prefill.py tests/test_architectures_kernels.py \
    -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" || status=1
fi
if want modes; then
  echo "== selection modes against exact top-k =="
  $PY benchmarks/select_modes.py ${MODE_SHAPES:+--shapes "$MODE_SHAPES"} --out "$OUT" 2>&1 | tee "$OUT/select_modes.log" || status=1
fi
if want bench && [ "${SWEEP:-0}" = 1 ]; then
  OUT="$OUT/sweep" INSTALL=0 bash benchmarks/bench_sweep.sh || status=1
elif want bench; then
echo "== bench =="
if [ "${QUICK:-0}" = 1 ]; then
  BATCH=1,16; SEQ=4096,16384
else
  BATCH=1,16; SEQ=4096,16384,65536
fi
# the main run first (bench.png is drawn from it), then GQA with a shared selection per KV head
# and, unless QUICK, loki-triton on the plain key layout (neither redraws the plot)
$PY -m lokitool bench --model llama2-13b --batch-size "$BATCH" --seq-len "$SEQ" --kf 0.25 --df 0.25 \
  --dtype float16 --methods sdpa,loki-torch,loki-triton --layout split --output-path "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1
{
  $PY -m lokitool bench --model llama3-8b --batch-size 16 --seq-len 16384 --group kv --output-path "$OUT" --no-plot
  if [ "${QUICK:-0}" != 1 ]; then
    $PY -m lokitool bench --model llama2-13b --batch-size 16 --seq-len 4096,16384 --methods loki-triton --layout plain \
      --output-path "$OUT" --no-plot
  fi
} 2>&1 | tee "$OUT/bench_extra.log" || status=1
fi

if want host; then
  echo "== host time per loki_decode call =="
  $PY benchmarks/host_overhead.py --out "$OUT" 2>&1 | tee "$OUT/host_overhead.log" || status=1
fi

if want info && [ "${QUICK:-0}" != 1 ]; then
  echo "== kernel configs, registers, spills =="
  $PY benchmarks/kernel_info.py 2>&1 | tee "$OUT/kernel_info.log" || status=1
fi
if want eval && [ "${EVAL:-1}" = 1 ]; then
  echo "== eval --ppl speed =="
  $PY benchmarks/eval_speed.py --preset llama2-7b --seq-len 4096 --out "$OUT" 2>&1 | tee "$OUT/eval_speed.log" || status=1
fi
exit $status
