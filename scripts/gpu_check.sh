#!/usr/bin/env bash
# `make gpu-check`: on a CUDA machine, the real path's speed, memory and parity as one JSON
# (scripts/gpu_check.py; about 6 minutes on one H200). A machine that lacks text23d's pure-Python
# dependencies gets them from the wheels `make gpu-wheels` put in .whl/ (installed into a temporary
# folder on PYTHONPATH, nothing else touched). Extra arguments go to gpu_check.py (--device cpu --tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import diffusers, hydra, omegaconf, trimesh, mcubes, xatlas, fast_simplification" 2>/dev/null; then
  if [ ! -d .whl ]; then
    echo "gpu-check: diffusers, hydra-core, omegaconf, trimesh ... are missing and there is no .whl/ folder." \
         "Fix: run 'make gpu-wheels' on a machine with the package registry, and bring .whl/ along" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/text23d-site .whl/*.whl
  export PYTHONPATH=/tmp/text23d-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
out=${OUT:-outputs}
mkdir -p "$out"
exec "$PY" scripts/gpu_check.py --out "$out/gpu_check.json" "$@"
