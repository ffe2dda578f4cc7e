#!/usr/bin/env bash
# SWEEP of `lokitool bench` (issue 12), run from the repository root on a CUDA machine: Loki decode
# (loki-triton) against SDPA over context 1k..128k, batch 1 and 16, for
#   llama2-13b (H = Hkv = 40, one selection per query head) and
#   llama3-8b --group kv (H = 32, Hkv = 8, one selection per KV head),
# fp16, kf = df = 0.25, keys in the two-plane layout; each point timed both ways (median of CUDA-graph
# replays, median of plain launches). Points whose cache does not fit in GPU memory are skipped by
# bench itself (a note in the row). Writes to $OUT (default runs/bench_sweep):
#   <model>/bench.csv, <model>/bench.json   bench's own rows, one folder per model
#   sweep.csv, sweep.json                    one row per point: times, both speedups, selection mode, byte ceiling
#   sweep.png                                speedup over SDPA against context, CUDA graph and plain launches
#   sweep.log
# Settings: SEQ (contexts), BATCH, METHODS (default sdpa,loki-triton), MODELS (default both),
# INSTALL=0 to skip `pip install -e .` (benchmarks/gpu_env.sh), PYTHON for the interpreter.
# Each point autotunes its kernels once and times ~1 s; where one call may not run the whole sweep,
# run one model per call (MODELS=llama2-13b, then MODELS=llama3-8b-kv) and join the two bench.csv
# files afterwards: python benchmarks/sweep_plot.py llama2-13b=A/bench.csv llama3-8b-kv=B/bench.csv --out DIR
# Add METHODS=sdpa,loki-torch,loki-triton for max_err_vs_loki_torch (loki-triton's output against the
# torch reference: a wrong kept set shows there), at the cost of the torch path's time and memory.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench_sweep}
SEQ=${SEQ:-1024,4096,16384,32768,65536,131072}
BATCH=${BATCH:-1,16}
METHODS=${METHODS:-sdpa,loki-triton}
MODELS=${MODELS:-llama2-13b,llama3-8b-kv}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh  # INSTALL=0 skips the install

(
  status=0
  for model in ${MODELS//,/ }; do
    case "$model" in
      llama2-13b) args=(--model llama2-13b --group head) ;;
      llama3-8b-kv) args=(--model llama3-8b --group kv) ;;
      llama3-8b) args=(--model llama3-8b --group head) ;;
      *) echo "unknown model $model (llama2-13b, llama3-8b-kv, llama3-8b)"; exit 2 ;;
    esac
    echo "== $model: B=$BATCH S=$SEQ =="
    mkdir -p "$OUT/$model"
    rm -f "$OUT/$model/bench.csv"
    $PY -m lokitool bench "${args[@]}" --batch-size "$BATCH" --seq-len "$SEQ" --kf 0.25 --df 0.25 --dtype float16 \
      --methods "$METHODS" --layout split --output-path "$OUT/$model" --no-plot || status=1
  done
  exit $status
) 2>&1 | tee "$OUT/sweep.log"
status=${PIPESTATUS[0]}
csvs=()
for model in ${MODELS//,/ }; do csvs+=("$model=$OUT/$model/bench.csv"); done
$PY benchmarks/sweep_plot.py "${csvs[@]}" --out "$OUT" 2>&1 | tee -a "$OUT/sweep.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit "$status"
