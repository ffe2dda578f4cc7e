#!/usr/bin/env bash
# The runs of reports/eval/peers (issue 15): every selector at 0.375 and 0.25 bytes per decode step,
# one kept set per KV head (--group union), one window of 1024 held-out tokens; the two budgets run
# side by side, one thread each. Usage: benchmarks/peers_runs.sh CAL DIR
# (CAL: `lokitool calibrate --num-tokens 16384 --seq-len 1024 --output CAL`, query statistics on).
set -u
CAL=${1:-/tmp/peers-cal.safetensors}
DIR=${2:-runs/peers}
L="${LOKITOOL:-.venv/bin/lokitool} eval --ppl --model default --calibration $CAL --num-tokens 1024 --seq-len 1024 --device cpu --df 0.25 --basis pre,post,qa-post --group union"
OMP_NUM_THREADS=1 $L --methods full,exact-topk,loki,sparq,quest,double-sparsity,h2o --bytes 0.375 --output-path "$DIR/union-0.375" &
OMP_NUM_THREADS=1 $L --methods exact-topk,loki,sparq,quest,double-sparsity,h2o --bytes 0.25 --output-path "$DIR/union-0.25" &
wait
