#!/usr/bin/env bash
# Calibration on the lent GPU machine (2 GPUs): hooks + statistics overhead against a plain forward on
# one GPU, then data-parallel calibration on 1 vs 2 GPUs through torchrun, checked for equality.
# Needs .devcarry/tokenizer (the embedded model's tokenizer) and .devcarry/text (a folder of .txt).
# Usage on the device: bash benchmarks/calibrate_gpu.sh  (writes under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ROOT=$(pwd)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpus.txt"

DP_SHAPE=${DP_SHAPE:-llama3.2-1b}    # the model of the data-parallel run
DP_TOKENS=${DP_TOKENS:-786432}
echo "== overhead of hooks + statistics vs plain forward (1 GPU)"
for shape in ${OVERHEAD_SHAPES-smollm2-135m llama3.2-1b}; do
  CUDA_VISIBLE_DEVICES=0 python3 "$ROOT/benchmarks/calibrate_throughput.py" --shape $shape --device cuda --dtype bfloat16 \
    --num-tokens 131072 --seq-len 2048 --batch-size 8 --output "$OUT/throughput.jsonl"
done

echo "== data parallel: 1 vs 2 GPUs"
python3 "$ROOT/benchmarks/random_model.py" "$DP_SHAPE" /tmp/model-dp --tokenizer "$ROOT/.devcarry/tokenizer"
ARGS="calibrate --model /tmp/model-dp --dataset $ROOT/.devcarry/text --num-tokens $DP_TOKENS --seq-len 2048 --batch-size 8 --device cuda --dtype bfloat16"
CUDA_VISIBLE_DEVICES=0 python3 -m lokitool $ARGS --output "$OUT/one-gpu.safetensors" 2>&1 | tail -3 | tee "$OUT/dp-$DP_SHAPE.txt"
torchrun --nproc-per-node 2 -m lokitool $ARGS --output "$OUT/two-gpu.safetensors" 2>&1 | tail -3 | tee -a "$OUT/dp-$DP_SHAPE.txt"
python3 - "$OUT" <<'PY' | tee -a "$OUT/dp-$DP_SHAPE.txt"
import sys, torch
from lokitool.calib.calibration import Calibration
a = Calibration.load(f"{sys.argv[1]}/one-gpu.safetensors"); b = Calibration.load(f"{sys.argv[1]}/two-gpu.safetensors")
for kind in ("pre", "post"):
    ea, eb = a.pca[kind].eigenvalues.double(), b.pca[kind].eigenvalues.double()
    print(kind, "max relative eigenvalue difference", float(((ea - eb).abs() / ea.abs().clamp_min(1e-12)).max()),
          "covariance rel. diff", float((a.pca[kind].covariance() - b.pca[kind].covariance()).norm() / a.pca[kind].covariance().norm()))
PY
rm -f "$OUT"/*.safetensors
