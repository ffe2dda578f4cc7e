# Sourced by the GPU scripts, from the repository root: puts lokitool on the path without
# installing it, through a shadow tree (src/lokitool, with kernels/ as lokitool.kernels).
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
shadow=$(mktemp -d)
mkdir -p "$shadow/lokitool"
for f in src/lokitool/*; do ln -s "$PWD/$f" "$shadow/lokitool/"; done
ln -s "$PWD/kernels" "$shadow/lokitool/kernels"
export PYTHONPATH="$shadow${PYTHONPATH:+:$PYTHONPATH}"
