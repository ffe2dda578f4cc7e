#!/usr/bin/env bash
# The perplexity runs summarised in reports/eval/README.md. Usage: benchmarks/eval_runs.sh DIR
# (DIR/older.safetensors: a calibration of the embedded model on sotu:calibration, 65536 tokens).
set -u
DIR=${1:-runs/eval}
L="${LOKITOOL:-.venv/bin/lokitool} eval --ppl --calibration $DIR/older.safetensors --num-tokens 2048 --seq-len 1024"
$L --methods full,exact-topk,h2o,loki,random-basis --basis pre,post,qa-pre,qa-post --kf 0.25 --df 0.25,0.5 --sink 0 --output-path "$DIR/A-per-row"
$L --methods exact-topk,loki,random-basis --basis post,qa-post --kf 0.25 --df 0.25,0.5 --sink 1 --output-path "$DIR/B-sink"
$L --methods full,exact-topk,h2o,loki,random-basis --basis post --kf 0.25 --df 0.25 --budget window --output-path "$DIR/C-window"
$L --methods exact-topk,h2o,loki,random-basis --basis post,qa-post --kf 0.125,0.5 --df 0.25 --output-path "$DIR/D-sweep"
$L --methods loki,random-basis --basis pre,qa-pre --kf 0.25 --df 0.25,0.5 --sink 1 --output-path "$DIR/E-sink-pre"
$L --methods exact-topk,loki,random-basis --basis post,qa-post --kf 0.25 --df 0.25 --group kv --output-path "$DIR/F-group-kv"
