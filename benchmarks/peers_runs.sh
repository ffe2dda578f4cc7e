#!/usr/bin/env bash
# The perplexity runs of reports/eval/peers (issue 15): every selector at 0.375 and 0.25 bytes per decode
# step, one kept set per KV head (--group union), two windows of 1024 held-out tokens; then H2O at the kf
# that spends those bytes when it reads 3 x kf (it selects per query head). One run after the other, one
# thread each (the machine is shared). Usage: benchmarks/peers_runs.sh CAL DIR
# (CAL: `lokitool calibrate --num-tokens 16384 --seq-len 1024 --output CAL`, query statistics on).
set -eu
CAL=${1:-/tmp/peers-cal.safetensors}
DIR=${2:-runs/peers}
E="${LOKITOOL:-.venv/bin/lokitool} eval --ppl --model default --calibration $CAL --num-tokens 2048 --seq-len 1024 --device cpu"
L="$E --df 0.25 --basis pre,post,qa-post --group union"
export OMP_NUM_THREADS=1
$L --methods full,exact-topk,loki,sparq,quest,double-sparsity,h2o --bytes 0.375 --output-path "$DIR/union-0.375"
$L --methods exact-topk,loki,sparq,quest,double-sparsity,h2o --bytes 0.25 --output-path "$DIR/union-0.25"
$E --group union --methods h2o --kf 0.125,0.083333 --output-path "$DIR/h2o-per-head-bytes"
