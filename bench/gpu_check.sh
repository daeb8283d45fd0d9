#!/usr/bin/env bash
# One GPU session's work (see ../shared/GPU.md): build for this GPU's arch, run the whole test suite, run
# compute-sanitizer on small cases of every kernel, run the benchmarks. Logs and JSON go to $OUT (or ./out).
#   SUBQ_GPU_STEPS="build test sanitize bench"   which steps to run (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
STEPS=${SUBQ_GPU_STEPS:-build test sanitize bench}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONUNBUFFERED=1
# The GPU image sets CXX to /opt/gcc/bin/g++, whose libstdc++ gets linked into _C.so beside the system one that
# torch loads: two copies crash on the first formatted error message. Build with the system compiler, as torch was.
export CC=/usr/bin/gcc CXX=/usr/bin/g++
ARCH=$(python3 -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}' + ('a' if c[0] == 9 else ''))")
summary=()
step() { summary+=("$1: $2"); echo "=== $1: $2"; }

if [[ $STEPS == *build* ]]; then
  start=$SECONDS
  SUBQ_CUDA_ARCHS=$ARCH MAX_JOBS=$(nproc) python3 -m pip install -v --no-build-isolation --no-deps -e . \
    >"$OUT/build.log" 2>&1
  step build "exit $? for sm_$ARCH in $((SECONDS - start)) s"
fi
python3 -c "import subq, torch; print('subq', subq.cuda_built(), subq.cuda_archs(), torch.cuda.get_device_name())"

if [[ $STEPS == *test* ]]; then
  # No -x: most fused kernels have never run, and one run should report every failure, not the first.
  python3 -m pytest tests -q -rf -p no:cacheprovider >"$OUT/pytest.log" 2>&1
  step tests "exit $? ($(tail -n 1 "$OUT/pytest.log"))"
fi

if [[ $STEPS == *sanitize* ]]; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 9 python3 bench/sanitize_cases.py >"$OUT/sanitize_$tool.log" 2>&1
    step "sanitizer $tool" "exit $? ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -n 1))"
  done
fi

if [[ $STEPS == *bench* ]]; then
  for script in bench/bench_*.py; do
    name=$(basename "$script" .py)
    python3 "$script" --out "$OUT/$name.json" >"$OUT/$name.log" 2>&1
    step "$name" "exit $?"
    tail -n 30 "$OUT/$name.log"
  done
  if python3 -c "import subq.profile" 2>/dev/null; then
    python3 -m subq.profile --out "$OUT/profile" >"$OUT/profile.log" 2>&1
    step profile "exit $?"
  fi
fi

printf '%s\n' "${summary[@]}"
grep -E "FAILED|Error" "$OUT/pytest.log" 2>/dev/null | head -n 20
