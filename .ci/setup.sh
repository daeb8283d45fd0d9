#!/usr/bin/env bash
# Everything a fresh machine needs before subq runs: Python dependencies (torch==2.11.0 only when no torch is
# installed), then the extension built in place. Idempotent: a second run recompiles only the sources that changed
# (the objects persist in build/<kind>/; build/last_build.txt says how many were reused).
#   SUBQ_CUDA_ARCHS="80;89;90a" (default)   SUBQ_BUILD_CUDA=0 for a CPU-only build
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi

if ! $PY -c "import torch" 2>/dev/null; then
  echo "subq setup: installing torch==2.11.0"
  $PY -m pip install -q torch==2.11.0
fi
$PY -m pip install -q "nvidia-cutlass>=4.2,<4.3" pybind11 ninja numpy pytest hypothesis matplotlib safetensors transformers setuptools wheel

start=$SECONDS
MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY -m pip install -q --no-build-isolation --no-deps -e .
cat build/last_build.txt  # how many compiled objects the persistent build folder let it reuse
$PY -c "import subq; print(f'subq setup: built in {$SECONDS - $start} s; cuda_built={subq.cuda_built()} archs={subq.cuda_archs()!r}')"
