#!/usr/bin/env bash
# `lokitool calibrate --device-map balanced` (accelerate; `auto` would keep a small model on one card) on 2 GPUs: spread over both
# cards by accelerate and the hooks follow its layers; the result must equal a one-GPU run.
# Needs .devcarry/tokenizer and .devcarry/text (see calibrate_gpu.sh). Writes under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ROOT=$(pwd)
OUT=${OUT:-/tmp/out}
SHAPE=${SHAPE:-llama3.2-1b}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh
python3 "$ROOT/benchmarks/random_model.py" "$SHAPE" /tmp/model-dm --tokenizer "$ROOT/.devcarry/tokenizer"
ARGS="calibrate --model /tmp/model-dm --dataset $ROOT/.devcarry/text --num-tokens 262144 --seq-len 2048 --batch-size 8 --dtype bfloat16"
CUDA_VISIBLE_DEVICES=0 python3 -m lokitool $ARGS --device cuda --output "$OUT/one.safetensors" 2>&1 | tail -1 | tee "$OUT/device_map.txt"
python3 -m lokitool $ARGS --device-map balanced --output "$OUT/sharded.safetensors" 2>&1 | tail -1 | tee -a "$OUT/device_map.txt"
python3 - "$OUT" <<'PY' | tee -a "$OUT/device_map.txt"
import sys
from transformers import AutoModelForCausalLM
from lokitool.calib.calibration import Calibration
m = AutoModelForCausalLM.from_pretrained("/tmp/model-dm", device_map="balanced")
print("layers per device:", sorted({str(p.device) for p in m.parameters()}))
a = Calibration.load(f"{sys.argv[1]}/one.safetensors"); b = Calibration.load(f"{sys.argv[1]}/sharded.safetensors")
for kind in ("pre", "post"):
    ca, cb = a.pca[kind].covariance(), b.pca[kind].covariance()
    print(kind, "relative covariance difference", float((ca - cb).norm() / ca.norm()))
PY
rm -f "$OUT"/*.safetensors
