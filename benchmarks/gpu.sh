#!/usr/bin/env bash
# The prepared GPU run, for a CUDA machine without network access: `bash benchmarks/gpu.sh OUT
# [python -m benchmarks.gpu options]`. Where its Python lacks diffusers, platformdirs,
# importlib_metadata or lazy-importer, put their wheels into .whl/ first (BENCHMARKS.md says
# which, and how to download them for another machine); they are installed into a private
# folder, never over the image's own packages.
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT [options of python -m benchmarks.gpu]}
shift
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/stc-site .whl/*.whl
  export PYTHONPATH="/tmp/stc-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu.csv" 2>&1 || true
python3 -m benchmarks.gpu --out "$out" "$@" 2>&1 | tee "$out/log.txt"
