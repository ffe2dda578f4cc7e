#!/usr/bin/env bash
# One device call of issue 12's stage profile (benchmarks/stage_lab.py), from the repository root on a CUDA
# machine; everything lands in $OUT/lab.tar.gz (the device returns few files):
#   tests   the compiled kernel tests (score, select, attention, decode, decode_full)
#   flush   whole steps (SDPA, loki_decode) timed after an L2 flush by writing (triton's do_bench, the
#           default) and by reading (LOKITOOL_L2_FLUSH=read: the L2 left clean)
#   stages  each stage alone under every autotune config, the attention at several split counts and on
#           contiguous rows, the selection's launches as cumulative prefixes ($SHAPES)
#   host    one loki_decode call's host time (benchmarks/host_overhead.py)
#   rowcap  the row selection with longer register tiles (LOKITOOL_ROW_CAP 32768, 65536) against the
#           split and pivot modes, whole steps (benchmarks/select_modes.py; $ROWCAP_SHAPES)
#   e2eprof the static loop's step kernel by kernel, full attention and Loki (benchmarks/e2e_profile.py;
#           $E2E_ARGS)
#   modes   the selection modes side by side, the split mode phase by phase and in one launch, selection
#           alone and whole steps (benchmarks/select_modes.py; $MODES_SHAPES: batch 1 by default)
#   steps   whole steps, graph and plain, after do_bench's flush (stage_lab.py --parts none; $FLUSH_SHAPES)
#   fused   the same whole steps through the three stages (LOKITOOL_FUSED_STEP=0) and through the one-kernel
#           step at every shape (=1; kernels/loki_step.py)
# STEPS picks steps (default: all). Set PYTHON for the interpreter, INSTALL=0 to skip the install.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/lab}
R=$OUT/lab
mkdir -p "$R"
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/env.log" 2>&1
STEPS=" ${STEPS:-tests flush stages host rowcap e2eprof} "
TESTS=${TESTS:-tests/test_kernel_step.py tests/test_kernel_score.py tests/test_kernel_select.py tests/test_kernel_attention.py tests/test_kernel_decode.py tests/test_kernel_decode_full.py}
want() { [[ "$STEPS" == *" $1 "* ]]; }
lab() { local name=$1 t=$2; shift 2; timeout "$t" $PY benchmarks/stage_lab.py "$@" --out "$R/$name" > "$R/$name.out" 2>&1; echo "$name rc $?"; }
if want tests; then
  LOKITOOL_AUTOTUNE=0 timeout 240 $PY -m pytest -q -x -p no:cacheprovider $TESTS > "$R/tests.log" 2>&1
  echo "tests rc $?"; tail -2 "$R/tests.log"
fi
FLUSH_SHAPES=${FLUSH_SHAPES:-llama3-8b:1:16384:kv,llama3-8b:1:32768:kv,llama3-8b:1:131072:kv,llama2-13b:1:32768:head,llama2-13b:1:131072:head,llama3-8b:16:16384:kv,llama2-13b:16:4096:head}
if want flush; then
  for f in write read; do LOKITOOL_L2_FLUSH=$f lab flush_$f 100 --parts none --shapes "$FLUSH_SHAPES"; done
fi
SHAPES=${SHAPES:-llama3-8b:16:16384:kv,llama3-8b:1:32768:kv,llama2-13b:1:32768:head}
if want steps; then
  lab steps 150 --parts none --shapes "$FLUSH_SHAPES"
fi
if want fused; then  # the one-kernel step (loki_step.py) against the three stages, at every shape
  for f in 0 1; do LOKITOOL_FUSED_STEP=$f lab fused$f 200 --parts none --shapes "$FLUSH_SHAPES"; done
fi
MODES_SHAPES=${MODES_SHAPES:-llama3-8b:1:16384:kv,llama3-8b:1:32768:kv,llama3-8b:1:65536:kv,llama3-8b:1:131072:kv,llama2-13b:1:16384:head,llama2-13b:1:32768:head,llama3-8b:2:32768:kv}
if want modes; then
  timeout 300 $PY benchmarks/select_modes.py --shapes "$MODES_SHAPES" --out "$R/modes" > "$R/modes.out" 2>&1; echo "modes rc $?"
fi
if want stages; then
  lab stages 300 --shapes "$SHAPES"
fi
if want host; then
  timeout 90 $PY benchmarks/host_overhead.py --out "$R/host" > "$R/host.out" 2>&1; echo "host rc $?"
fi
if want e2eprof; then
  timeout 300 $PY benchmarks/e2e_profile.py ${E2E_ARGS:---model llama3-8b --batch 16 --context 16384 --group kv --compile} \
    --out "$R/e2eprof" > "$R/e2eprof.out" 2>&1; echo "e2eprof rc $?"
fi
if want rowcap; then
  for cap in 32768 65536; do
    if [ $cap = 32768 ]; then shapes=llama3-8b:1:32768:kv,llama2-13b:1:32768:head,llama3-8b:16:32768:kv,llama2-13b:16:32768:head
    else shapes=llama3-8b:1:65536:kv,llama2-13b:1:65536:head; fi
    shapes=${ROWCAP_SHAPES:-$shapes}
    LOKITOOL_ROW_CAP=$cap timeout 200 $PY benchmarks/select_modes.py --shapes "$shapes" --out "$R/rowcap$cap" > "$R/rowcap$cap.out" 2>&1
    echo "rowcap $cap rc $?"
  done
fi
tar czf "$OUT/lab.tar.gz" -C "$OUT" lab
for f in "$R"/*/stage_lab.log; do echo "== ${f#$R/}"; grep -E "loki|select |row kernel autotuned|attn autotuned|contiguous" "$f"; done
head -12 "$R/host.out" 2>/dev/null
cat "$R"/e2eprof.out "$R"/rowcap*.out "$R"/modes.out 2>/dev/null | grep -v "^\s*$" | tail -80
