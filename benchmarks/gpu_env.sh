# Sourced by the GPU scripts, from the repository root: installs this checkout (editable, no
# dependencies: the GPU machine has torch, triton and transformers, and no internet), so
# `lokitool` and `lokitool.kernels` import as a user's install would. Set PYTHON to choose the
# interpreter; INSTALL=0 skips the install (a later script of the same call).
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if [ "${INSTALL:-1}" = 1 ]; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^\s*$" | tail -2
fi
